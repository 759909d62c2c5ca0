"""Defaults that depend on the model, the PEFT method or the hardware, filled in once the config is composed.

A user's own model and data must never inherit the embedded demo's settings (those live in
conf/experiment/demo.yaml), and a number that only makes sense for one model or method is not a constant
in a schema. So these keys default to null / `auto` and are decided here, before the config is frozen, so
that `trainer train --cfg job`, `trainer plan`, `trainer data check` and the run itself see the same values:

- `optim.lr`: the usual peak learning rate of the PEFT method (full fine-tuning 2e-5, LoRA/QLoRA/DoRA 2e-4...).
- `data.max_seq_len`: the model's context length (config.json's max_position_embeddings), capped at 2048 tokens,
  a length most instruction data fits in and that trains at a sensible memory cost.
- `model.attn_implementation`: sdpa, except for families whose attention sdpa cannot compute (Gemma 2's logit
  soft-capping: eager).
- `train.precision`: bf16 on GPUs that have it (compute capability 8.0+), fp16 on older GPUs (fp32 under FSDP,
  which has no loss scaling), fp32 on CPU.
"""

from __future__ import annotations

import json
import os
from typing import Any

from trainer.hardware import BF16_MIN_COMPUTE_CAPABILITY, local_gpus

# Peak learning rates per PEFT method: the middle of what the methods' papers and the PEFT docs train with.
DEFAULT_LEARNING_RATES = {
    "none": 2e-5,  # full fine-tuning
    "lora": 2e-4,
    "dora": 2e-4,
    "qlora": 2e-4,
    "ia3": 3e-3,
    "prompt_tuning": 3e-2,
    "prefix_tuning": 1e-2,
}
MAX_DEFAULT_SEQ_LEN = 2048
# Model types whose attention needs something sdpa does not do, and the implementation that does it.
EAGER_ONLY_MODEL_TYPES = {"gemma2": "its attention logit soft-capping"}
FALLBACK_SEQ_LEN = 2048  # a model config that names no context length


PREFERENCE_LR_FACTOR = 0.1


def default_learning_rate(peft_name: str) -> float:
    return DEFAULT_LEARNING_RATES.get(peft_name, DEFAULT_LEARNING_RATES["lora"])


def model_architecture(model_cfg: Any) -> dict:
    """The model's config.json fields: from model.path when it holds one, else the conf entry's model.arch."""
    path = getattr(model_cfg, "path", None)
    if path and os.path.isfile(os.path.join(path, "config.json")):
        try:
            with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
                return json.load(fh)
        except (OSError, ValueError):
            return dict(getattr(model_cfg, "arch", None) or {})
    return dict(getattr(model_cfg, "arch", None) or {})


def model_context_length(model_cfg: Any) -> int | None:
    arch = model_architecture(model_cfg)
    arch = arch.get("text_config", arch)  # multimodal configs keep the language model's fields apart
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = arch.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def default_max_seq_len(model_cfg: Any) -> int:
    context = model_context_length(model_cfg)
    return min(context, MAX_DEFAULT_SEQ_LEN) if context else FALLBACK_SEQ_LEN


def auto_precision(strategy_name: str, launcher: Any) -> tuple[str, str]:
    """(precision, why) for train.precision=auto on the hardware this run will use."""
    if getattr(launcher, "name", "local") == "slurm":
        if int(getattr(launcher, "gpus_per_node", 0) or 0) > 0:
            return "bf16", "Slurm GPUs, assumed bf16-capable (A100/H100 class); set train.precision=fp16 for V100/T4"
        return "fp32", "a Slurm job without GPUs"
    gpus = local_gpus()
    if not gpus:
        return "fp32", "no GPU here"
    if min(gpu.compute_capability for gpu in gpus) >= BF16_MIN_COMPUTE_CAPABILITY:
        return "bf16", "the GPUs support bf16"
    if strategy_name == "fsdp":
        return "fp32", "GPUs without bf16, and FSDP has no fp16 loss scaling"
    return "fp16", "GPUs without bf16 (fp16 with loss scaling)"


def sdpa_refusal(model_cfg: Any) -> str | None:
    """Why sdpa cannot run this model's attention, or None."""
    return EAGER_ONLY_MODEL_TYPES.get(model_architecture(model_cfg).get("model_type"))


def apply_defaults(sections: dict[str, Any]) -> list[str]:
    """Fill the unset keys of composed, typed sections in place; returns one note per value decided."""
    notes = []
    model = sections.get("model")
    if model is not None and model.attn_implementation == "auto":
        why = sdpa_refusal(model)
        model.attn_implementation = "eager" if why else "sdpa"
        if why:
            notes.append(f"model.attn_implementation=eager (sdpa cannot apply {why})")
    optim, peft, data = sections.get("optim"), sections.get("peft"), sections.get("data")
    if optim is not None and optim.lr is None and peft is not None:
        optim.lr = default_learning_rate(peft.name)
        objective = getattr(sections.get("objective"), "name", "sft")
        if objective != "sft":
            # Preference tuning starts from a model that already answers well and moves it a little: a tenth of
            # the method's SFT rate (full fine-tuning 2e-6, LoRA 2e-5), the range DPO recipes use.
            optim.lr *= PREFERENCE_LR_FACTOR
            notes.append(f"optim.lr={optim.lr:g} (a tenth of peft={peft.name}'s SFT default, for "
                         f"objective={objective})")
        else:
            notes.append(f"optim.lr={optim.lr:g} (the default for peft={peft.name})")
    if data is not None and data.max_seq_len is None and "model" in sections:
        data.max_seq_len = default_max_seq_len(sections["model"])
        context = model_context_length(sections["model"])
        notes.append(f"data.max_seq_len={data.max_seq_len} (the model's context is "
                     f"{context if context else 'not given'}; capped at {MAX_DEFAULT_SEQ_LEN})")
    train, strategy = sections.get("train"), sections.get("strategy")
    if train is not None and train.precision == "auto" and strategy is not None:
        train.precision, why = auto_precision(strategy.name, sections.get("launcher"))
        notes.append(f"train.precision={train.precision} ({why})")
    return notes
