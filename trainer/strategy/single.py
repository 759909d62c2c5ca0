"""One process, one device: CUDA when present (or asked), else CPU."""

from __future__ import annotations

import contextlib

from trainer.strategy.precision import apply_activation_checkpointing, autocast_context, build_grad_scaler


class SingleDeviceStrategy:
    rank = 0
    world_size = 1

    def __init__(self, cfg, train_cfg):
        import torch

        want = cfg.device
        if want == "auto":
            want = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(want)
        self.precision = train_cfg.precision
        self.gradient_checkpointing = train_cfg.gradient_checkpointing
        self.scaler = build_grad_scaler(self.device, self.precision)

    @property
    def is_main(self) -> bool:
        return True

    @property
    def loss_multiplier(self) -> float:
        return 1.0

    def setup(self, model, build_optimizer):
        if self.gradient_checkpointing:
            apply_activation_checkpointing(model)
        model.to(self.device)
        return model, build_optimizer(model)

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def microbatch(self, model, is_last: bool):
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        import torch

        if self.scaler:
            self.scaler.unscale_(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
        if self.scaler:
            scale_before = self.scaler.get_scale()
            self.scaler.step(optimizer)
            self.scaler.update()
            applied = self.scaler.get_scale() >= scale_before  # a lowered scale means inf/nan grads: step skipped
        else:
            optimizer.step()
            applied = True
        optimizer.zero_grad(set_to_none=True)
        return float(norm), applied

    def all_reduce_sum(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    def unwrap(self, model):
        return model

    def close(self) -> None:
        pass
