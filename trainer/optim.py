"""Optimizer and learning-rate schedule.

Weight decay never applies to norms and biases (1-D tensors): decaying a norm's gain towards zero
shrinks activations rather than regularising.
"""

from __future__ import annotations

import math

from trainer.config.schema import OptimConfig


def param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model, cfg: OptimConfig):
    import torch

    params = param_groups(model, cfg.weight_decay)
    on_cuda = any(p.is_cuda for group in params for p in group["params"])
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps,
                             fused=True if on_cuda else None)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0, then cosine/linear decay to min_lr_ratio (or constant)."""
    warmup = int(round(cfg.warmup_ratio * total_steps))
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if cfg.scheduler == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    if cfg.scheduler == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * decay


def build_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    import torch

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, total_steps, cfg))
