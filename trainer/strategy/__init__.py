"""How the model is placed, wrapped and stepped: the one seam between the recipe and parallelism.

The recipe only talks to a `Strategy`; `build_strategy` is the one place that looks at which one is
configured. No other module branches on the strategy.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Callable, Protocol


class Strategy(Protocol):
    device: Any  # torch.device
    rank: int
    world_size: int

    @property
    def is_main(self) -> bool: ...

    def setup(self, model, build_optimizer: Callable[[Any], Any]) -> tuple[Any, Any]:
        """Place/wrap `model`, apply activation checkpointing if asked, and build its optimizer."""

    def autocast(self) -> AbstractContextManager:
        """The precision context for forward passes."""

    def microbatch(self, model, is_last: bool) -> AbstractContextManager:
        """Context for one micro batch; lets backends skip gradient sync until the last one."""

    @property
    def loss_multiplier(self) -> float:
        """Factor that undoes the backend's averaging of gradients over ranks (the loop sums tokens itself)."""

    def backward(self, loss) -> None: ...

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        """Clip, step and zero; returns (grad norm before clipping, whether the step was applied)."""

    def all_reduce_sum(self, value: float) -> float: ...

    def barrier(self) -> None: ...

    def unwrap(self, model) -> Any:
        """The underlying (PEFT or Hugging Face) model."""

    def close(self) -> None: ...


def build_strategy(cfg, train_cfg) -> Strategy:
    """The only dispatch on `strategy.name`."""
    if cfg.name == "single":
        from trainer.strategy.single import SingleDeviceStrategy

        return SingleDeviceStrategy(cfg, train_cfg)
    raise NotImplementedError(f"strategy {cfg.name!r}")
