"""Mixed precision shared by strategies: autocast contexts and fp16 loss scaling."""

from __future__ import annotations

import contextlib


def autocast_context(device, precision: str):
    import torch

    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def build_grad_scaler(device, precision: str):
    """fp16 needs dynamic loss scaling (its range underflows small gradients); bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    import torch

    return torch.amp.GradScaler(device.type)


def apply_activation_checkpointing(model) -> None:
    """Recompute activations in backward: Hugging Face's per-layer checkpointing, non-reentrant."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        # With frozen embeddings (LoRA) the checkpointed blocks' inputs need grads for backward to reach them.
        model.enable_input_require_grads()
