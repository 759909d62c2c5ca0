"""A PEFT LoRA adapter (LoRA, rsLoRA, or QLoRA's adapters) as a GGUF LoRA adapter that llama.cpp loads with
`--lora FILE` on the base model's GGUF.

llama.cpp applies `scale * (alpha / r) * B @ A` with alpha from `adapter.lora.alpha` and r read from the tensors.
rsLoRA scales by alpha / sqrt(r) instead, so its alpha is written as alpha * sqrt(r) to give the same update. What
llama.cpp's adapters cannot express is refused, each with its reason: DoRA (a per-feature magnitude), IA3 (scaling
vectors), per-module ranks or alphas, trained biases, and modules_to_save (whole replacement tensors). Merge those
into the base and export the model instead (`write_model`).
"""

from __future__ import annotations

import math
import os

from trainer.errors import UserError
from trainer.export_gguf.arch import family_for
from trainer.export_gguf.layout import gguf_name, read_hf_config, tensor_name_map
from trainer.export_gguf.model import finish, writing
from trainer.export_gguf.tensors import adapt_tensor

_PEFT_PREFIX = "base_model.model."
DTYPES = ("f32", "f16")


def _load_adapter(adapter_dir: str) -> tuple[dict, dict]:
    """(adapter_config.json, {name: fp32 numpy array}); read through torch, which, unlike numpy, knows bf16."""
    from safetensors.torch import load_file

    from trainer.adapters import read_adapter_config

    config = read_adapter_config(adapter_dir)
    path = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(path):
        raise UserError(f"{adapter_dir!r} has no adapter_model.safetensors")
    return config, {name: tensor.float().numpy() for name, tensor in load_file(path).items()}


def _check_exportable(config: dict, tensors: dict) -> None:
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"a GGUF adapter holds LoRA only; this is a {config.get('peft_type')} adapter: merge it "
                        "(--to merged) and export the model (--to gguf-model)")
    if config.get("use_dora"):
        raise UserError("DoRA adapters have no GGUF form (llama.cpp applies B @ A only, not DoRA's magnitude "
                        "rescaling): merge it (--to merged) and export the model (--to gguf-model)")
    if config.get("target_parameters"):
        raise UserError(f"the adapter trains parameters directly (target_parameters {config['target_parameters']}, "
                        "e.g. fused MoE experts), which a GGUF LoRA adapter cannot carry: merge it (--to merged) and "
                        "export the model (--to gguf-model)")
    if _patterns_in_use(config, tensors):
        raise UserError("per-module ranks or alphas (rank_pattern/alpha_pattern) cannot be written: a GGUF adapter "
                        "has one alpha for every tensor")
    others = sorted(name for name in tensors if ".lora_A." not in name and ".lora_B." not in name)
    if others:
        raise UserError(f"the adapter also trains {others[0]} ({len(others)} tensor(s) beside LoRA's A and B: "
                        "biases or modules_to_save), which a GGUF LoRA adapter cannot carry: merge it (--to merged) "
                        "and export the model (--to gguf-model)")


def _patterns_in_use(config: dict, tensors: dict) -> list[str]:
    """rank_pattern / alpha_pattern keys that match a module the adapter holds. PEFT writes patterns for modules it
    did not wrap too (for Mixtral: `.*\\.gate_up_proj`, the fused experts, while all-linear trains attention only);
    those change nothing and are no reason to refuse."""
    import re

    modules = {name.removeprefix(_PEFT_PREFIX).split(".lora_")[0] for name in tensors}
    patterns = [*(config.get("rank_pattern") or {}), *(config.get("alpha_pattern") or {})]
    return [p for p in patterns if any(re.fullmatch(f"(.*\\.)?{p}", module) for module in modules)]


def effective_alpha(config: dict) -> float:
    """The alpha that makes llama.cpp's alpha / r scaling equal PEFT's (alpha / sqrt(r) under rsLoRA)."""
    alpha, rank = float(config["lora_alpha"]), int(config["r"])
    return alpha * math.sqrt(rank) if config.get("use_rslora") else alpha


def write_lora_adapter(adapter_dir: str, out_path: str, base_dir: str | None = None, dtype: str = "f32") -> str:
    """Write `adapter_dir` (a PEFT LoRA adapter) as a GGUF adapter at `out_path`. The base model's config.json (from
    `base_dir`, else the adapter's base_model_name_or_path) gives the architecture and head counts."""
    import gguf
    import numpy as np

    if dtype not in DTYPES:
        raise UserError(f"adapter dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config, tensors = _load_adapter(adapter_dir)
    _check_exportable(config, tensors)
    base_dir = base_dir or config.get("base_model_name_or_path")
    if not base_dir or not os.path.isdir(base_dir):
        raise UserError(f"the base model dir {base_dir!r} is needed for its config.json: pass base_dir")
    hf_config = read_hf_config(base_dir)
    family = family_for(hf_config)
    names = tensor_name_map(family.gguf_arch, int(hf_config["num_hidden_layers"]))

    pairs: dict[str, dict[str, object]] = {}
    for name, array in tensors.items():
        module, kind = name.removeprefix(_PEFT_PREFIX).rsplit(".lora_", 1)
        pairs.setdefault(module, {})[kind.split(".")[0]] = array  # kind: "A.weight" / "B.weight"
    numpy_dtype = np.float32 if dtype == "f32" else np.float16
    tensors_out = {}
    for module in sorted(pairs):  # everything is converted (and may be refused) before the file is opened
        pair = pairs[module]
        if set(pair) != {"A", "B"}:
            raise UserError(f"{module} has lora_{''.join(pair)} without its partner")
        lora_a, lora_b = (np.asarray(pair[k], dtype=np.float32) for k in ("A", "B"))
        base = gguf_name(names, module)
        tensors_out[f"{base}.weight.lora_a"] = np.ascontiguousarray(lora_a, dtype=numpy_dtype)
        lora_b = adapt_tensor(hf_config, family, module, lora_b)  # row order, query scale: as the base's rows
        tensors_out[f"{base}.weight.lora_b"] = np.ascontiguousarray(lora_b, dtype=numpy_dtype)
    with writing(out_path) as partial:
        writer = gguf.GGUFWriter(partial, family.gguf_arch)
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, effective_alpha(config))
        writer.add_name(os.path.basename(os.path.abspath(adapter_dir)))
        for name, array in tensors_out.items():
            writer.add_tensor(name, array)
        finish(writer)
    return out_path
