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

    def setup(self, build_model: Callable[..., Any], build_optimizer: Callable[[Any], Any]) -> tuple[Any, Any]:
        """Build the model (`build_model(on_meta=..., all_in_compute_dtype=...)`), place/shard/wrap it, apply
        activation checkpointing if asked, and build its optimizer. Returns (model, optimizer)."""

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

    def all_reduce_max(self, value: float) -> float: ...

    def barrier(self) -> None: ...

    def unwrap(self, model) -> Any:
        """The underlying (PEFT or Hugging Face) model."""

    checkpoint_format: str  # "dcp" | "deepspeed": which strategies can load a checkpoint
    reshards_checkpoints: bool  # whether a checkpoint loads on another world size
    supports_async_save: bool

    def save_state(self, model, optimizer, directory: str, async_save: bool = False) -> Any:
        """Write model (trainable weights) and optimizer state; every rank writes its own part. With `async_save`,
        return a future that completes once this rank's files are written (else None)."""

    def load_state(self, model, optimizer, directory: str, saved_world_size: int | None = None,
                   scratch_dir: str | None = None) -> None:
        """Restore what save_state wrote, possibly on another world size than `saved_world_size`; a strategy that must
        convert the files for that may write the conversion under `scratch_dir` (removed after the load)."""

    def scaler_state_dict(self) -> dict | None:
        """The fp16 loss scaler's state (JSON-able), or None without one."""

    def load_scaler_state_dict(self, state: dict | None) -> None: ...

    def iter_full_state(self, model, trainable_only: bool):
        """(name, full tensor) one at a time, gathered from shards; None off rank 0. Collective."""

    def close(self) -> None: ...


def build_strategy(cfg, train_cfg, optim_cfg) -> Strategy:
    """The only dispatch on the configured strategy."""
    from trainer.config.schema import AutoStrategyConfig, DDPStrategyConfig, DeepSpeedStrategyConfig, FSDPStrategyConfig

    if isinstance(cfg, AutoStrategyConfig):  # `trainer train` resolves it before launch (launch/auto_strategy.py)
        from trainer.errors import ConfigError

        raise ConfigError("strategy", "auto must be resolved before the workers start: launch with `trainer train`")
    if isinstance(cfg, DeepSpeedStrategyConfig):
        from trainer.strategy.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(cfg, train_cfg, optim_cfg)
    if isinstance(cfg, FSDPStrategyConfig):
        from trainer.strategy.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, train_cfg, optim_cfg)
    if isinstance(cfg, DDPStrategyConfig):
        from trainer.strategy.ddp import DDPStrategy

        return DDPStrategy(cfg, train_cfg, optim_cfg)
    from trainer.strategy.single import SingleDeviceStrategy

    return SingleDeviceStrategy(cfg, train_cfg, optim_cfg)
