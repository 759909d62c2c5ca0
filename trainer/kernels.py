"""`model.kernels=liger`: Liger's Triton kernels for the decoder's RMSNorm, rotary embedding and SwiGLU MLP.

Fused kernels save the memory traffic of the many small element-wise ops those layers are made of (and their
saved activations). They replace the modules' forwards on this model instance before PEFT wraps it, so LoRA's
layers, which the MLP still calls as modules, keep working. The loss's fused linear cross-entropy is a separate
switch (objective.fused_kernel), because our chunked loss already never builds the full logits. CUDA only: Triton
does not run on the CPU.
"""

from __future__ import annotations

import importlib.util

from trainer.errors import ConfigError

KERNELS = ("none", "liger")
INSTALL_HINT = "pip install -e '.[kernels]' on the GPU machine (or model.kernels=none)"


def check_available(kernels: str) -> None:
    """At validation, before any worker starts: the package must be importable."""
    if kernels == "liger" and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError("model.kernels", f"liger needs the liger-kernel package, which is not installed: "
                          f"{INSTALL_HINT}")


def apply_kernels(model, kernels: str):
    """`model` with the chosen kernels in place of its own layers' forwards (the same object)."""
    if kernels == "none":
        return model
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("model.kernels", "liger runs Triton kernels on a CUDA GPU and this machine has none: set "
                          "model.kernels=none")
    from liger_kernel.transformers import _apply_liger_kernel_to_instance
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    model_type = model.config.model_type
    if model_type not in MODEL_TYPE_TO_APPLY_LIGER_FN:
        raise ConfigError("model.kernels", f"liger has no kernels for model_type {model_type!r} (it has "
                          f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}): set model.kernels=none")
    _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    return model
