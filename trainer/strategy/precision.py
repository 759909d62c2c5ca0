"""Mixed precision shared by strategies: autocast contexts and fp16 loss scaling."""

from __future__ import annotations

import contextlib
import math


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


def apply_activation_checkpointing(model, offload: bool = False) -> None:
    """Recompute activations in backward: Hugging Face's per-layer checkpointing, non-reentrant. `offload`
    (train.activation_offloading): the layers' inputs wait in host memory meanwhile (trainer/activation_offload.py)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        # With frozen embeddings (LoRA) the checkpointed blocks' inputs need grads for backward to reach them.
        model.enable_input_require_grads()
    if offload:
        from trainer.activation_offload import offload_checkpointed_inputs

        offload_checkpointed_inputs(model)


def clip_and_step(optimizer, max_grad_norm: float, scaler=None) -> tuple[float, bool]:
    """Unscale (fp16), clip the global norm, step unless gradients are non-finite, zero. Returns (norm, applied).
    Works for plain and DTensor (FSDP2) parameters: clip_grad_norm_ reduces the norm over shards."""
    import torch

    if scaler is not None:
        scaler.unscale_(optimizer)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    norm = float(norm)
    if scaler is not None:
        scale_before = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        applied = scaler.get_scale() >= scale_before  # a lowered scale means inf/nan gradients: step skipped
    else:
        # A step on NaN/inf gradients would write NaN into every weight it touches: never take it (the recipe's
        # train.nonfinite policy then skips the step or stops the run). The norm is global, so all ranks agree.
        applied = math.isfinite(norm)
        if applied:
            optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return norm, applied
