"""Optimizer and learning-rate schedule.

Weight decay never applies to norms and biases (1-D tensors): decaying a norm's gain towards zero
shrinks activations rather than regularising. With layer-wise LR decay each depth (trainer/freezing.py) gets its
own parameter groups, whose `lr` the scheduler scales like any other group's.

`optim.name` picks torch's AdamW (fused kernels on CUDA) or one of bitsandbytes' AdamW variants: 8-bit moments
(2 bytes of state per parameter instead of 8) and/or paged state that moves to host memory under pressure instead
of failing. bitsandbytes is imported only when one of those is asked for.
"""

from __future__ import annotations

import math

from trainer.config.schema import OptimConfig

BITSANDBYTES_OPTIMIZERS = {
    "adamw_8bit": "AdamW8bit",
    "paged_adamw_8bit": "PagedAdamW8bit",
    "paged_adamw_32bit": "PagedAdamW32bit",
}


def param_groups(model, weight_decay: float, lr: float | None = None, layer_lr_decay: float = 1.0) -> list[dict]:
    """Trainable parameters split by (decayed or not) x depth. Frozen parameters stay out of the optimizer; those
    that gradual unfreezing will thaw are still trainable when this runs, so they are in."""
    from trainer.freezing import count_layers, depth

    num_layers = count_layers(model) if layer_lr_decay != 1.0 else 0
    groups: dict[tuple[bool, int], list] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decays = not (param.ndim < 2 or name.endswith(".bias"))
        level = depth(name, num_layers) if layer_lr_decay != 1.0 else 0
        groups.setdefault((decays, level), []).append(param)
    result = []
    for (decays, level), params in sorted(groups.items(), key=lambda item: (not item[0][0], item[0][1])):
        group = {"params": params, "weight_decay": weight_decay if decays else 0.0}
        if layer_lr_decay != 1.0 and lr is not None:
            group["lr"] = lr * layer_lr_decay ** (num_layers + 1 - level)
        result.append(group)
    return result


def build_optimizer(model, cfg: OptimConfig):
    import torch

    if cfg.lr is None:  # decided per PEFT method when a config is composed (trainer/config/defaults.py)
        raise ValueError("optim.lr is not set: give a learning rate, or build the config with to_config, which "
                         "fills the PEFT method's default")

    params = param_groups(model, cfg.weight_decay, cfg.lr, cfg.layer_lr_decay)
    if cfg.name in BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes as bnb

        optimizer_class = getattr(bnb.optim, BITSANDBYTES_OPTIMIZERS[cfg.name])
        # bitsandbytes' AdamW defaults to weight_decay=0.01; every group carries its own, the default is ours too.
        return optimizer_class(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)
    # torch's fused kernel (CUDA, and CPU since torch 2.4) updates every tensor in one pass instead of a loop of
    # small ops per parameter: what HF Trainer uses too (adamw_torch_fused)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, fused=True)


def lr_multiplier(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Linear warmup from 0, then cosine/linear decay to min_lr_ratio (or constant)."""
    warmup = cfg.warmup_steps or int(round(cfg.warmup_ratio * total_steps))
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
