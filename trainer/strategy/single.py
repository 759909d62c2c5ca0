"""One process, one device: CUDA when present (or asked), else CPU."""

from __future__ import annotations

from trainer.strategy.base import StrategyBase
from trainer.strategy.env import DistEnv
from trainer.strategy.precision import apply_activation_checkpointing, build_grad_scaler, clip_and_step


class SingleDeviceStrategy(StrategyBase):
    def __init__(self, cfg, train_cfg, optim_cfg):
        import torch

        super().__init__(cfg, train_cfg, optim_cfg, DistEnv(0, 1, 0, "127.0.0.1", 29500))
        want = cfg.device if cfg.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        self.device = torch.device(want)
        self.scaler = build_grad_scaler(self.device, self.precision)

    @property
    def loss_multiplier(self) -> float:
        return 1.0

    def setup(self, build_model, build_optimizer):
        model = build_model()
        if self.train_cfg.gradient_checkpointing:
            apply_activation_checkpointing(model, self.train_cfg.activation_offloading)
        model.to(self.device)
        self.compile_if_asked(model)
        return model, build_optimizer(model)

    def backward(self, loss) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        return clip_and_step(optimizer, max_grad_norm, self.scaler)
