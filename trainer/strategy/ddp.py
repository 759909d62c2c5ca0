"""DistributedDataParallel: a full replica per rank, gradients all-reduced once per optimizer step."""

from __future__ import annotations

import contextlib

from trainer.strategy.base import StrategyBase
from trainer.strategy.precision import apply_activation_checkpointing, build_grad_scaler, clip_and_step


class DDPStrategy(StrategyBase):
    def __init__(self, cfg, train_cfg, optim_cfg):
        super().__init__(cfg, train_cfg, optim_cfg)
        self.scaler = build_grad_scaler(self.device, self.precision)

    def setup(self, build_model, build_optimizer):
        from torch.nn.parallel import DistributedDataParallel

        model = build_model()
        if self.train_cfg.gradient_checkpointing:
            apply_activation_checkpointing(model, self.train_cfg.activation_offloading)
        model.to(self.device)
        self.compile_if_asked(model)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        wrapped = DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=self.cfg.bucket_cap_mb,
                                          find_unused_parameters=self.cfg.find_unused_parameters,
                                          gradient_as_bucket_view=True)  # no second copy of the gradients
        return wrapped, build_optimizer(wrapped)

    def microbatch(self, model, is_last: bool):
        # Accumulate locally and all-reduce only with the last micro batch of the step.
        return contextlib.nullcontext() if is_last else model.no_sync()

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        return clip_and_step(optimizer, max_grad_norm, self.scaler)

    def unwrap(self, model):
        return model.module
