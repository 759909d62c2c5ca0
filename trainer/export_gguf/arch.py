"""One entry per Hugging Face `model_type`: the llama.cpp architecture it runs as, and everything about it that
differs from plain Llama. What is checked here is checked before a byte is written.

| model_type | llama.cpp arch | what differs |
|---|---|---|
| llama, mistral | llama | q/k rows reordered for ggml's adjacent-pair rope; llama3 rope as a `rope_freqs` tensor |
| mixtral | llama | experts stacked into 3-D `ffn_*_exps` tensors; expert_count / expert_used_count |
| qwen2 | qwen2 | q/k/v biases; rotate-half ("neox") rope as in transformers, so no reordering |
| gemma | gemma | RMSNorm scales by (1 + w) in transformers, by w in llama.cpp: 1 is added to every norm weight |
| gemma2 | gemma2 | as gemma, plus post-attention/post-ffw norms, soft-capping, the sliding-window layer pattern, and a
  query scale of 1/sqrt(query_pre_attn_scalar) that llama.cpp fixes to 1/sqrt(head_dim): the ratio is folded into
  q_proj's rows |
| phi3 | phi3 | fused qkv_proj / gate_up_proj stay fused (llama.cpp splits them in its graph); neox rope |

Sliding windows: llama.cpp's llama and phi3 graphs attend to the whole context (Mistral v0.1's 4096 and Phi-3's
2047-token windows are not applied, as with llama.cpp's own converter); only Gemma 2's is applied. Answers agree
with transformers' up to the window, which is what the tests check.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from trainer.errors import UserError
from trainer.export_gguf.layout import head_dim, rope_parameters


@dataclass(frozen=True)
class Family:
    gguf_arch: str
    adjacent_rope_pairs: bool  # llama.cpp's "normal" rope (llama arch): q/k rows are reordered (layout.py)
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp's by w
    has_output_tensor: bool = True  # gemma/gemma2 always reuse token_embd as the output projection
    activation: str = "silu"  # what llama.cpp's graph applies in the MLP (gelu = tanh approximation)
    rope_types: tuple[str, ...] = ("default",)  # rope_type values this exporter writes faithfully


_LLAMA = Family("llama", adjacent_rope_pairs=True, rope_types=("default", "linear", "llama3"))
FAMILIES: dict[str, Family] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "mixtral": _LLAMA,
    "qwen2": Family("qwen2", adjacent_rope_pairs=False, rope_types=("default", "linear")),
    "gemma": Family("gemma", adjacent_rope_pairs=False, norm_plus_one=True, has_output_tensor=False,
                    activation="gelu"),
    "gemma2": Family("gemma2", adjacent_rope_pairs=False, norm_plus_one=True, has_output_tensor=False,
                     activation="gelu"),
    "phi3": Family("phi3", adjacent_rope_pairs=False),
}
_ACTIVATIONS = {"silu": {"silu", "swish"}, "gelu": {"gelu_pytorch_tanh", "gelu_new", "gelu_fast"}}


def family_for(config: dict) -> Family:
    """The family of a config.json, or a UserError that says why this config cannot be written."""
    model_type = config.get("model_type", "?")
    family = FAMILIES.get(model_type)
    if family is None:
        raise UserError(f"config.json model_type {model_type!r} has no GGUF exporter here (supported: "
                        f"{', '.join(FAMILIES)}): use llama.cpp's convert_hf_to_gguf.py for it")
    rope_type = rope_parameters(config).get("rope_type") or "default"
    if rope_type not in family.rope_types:
        raise UserError(f"config.json rope type {rope_type!r} is not written for {model_type} (supported: "
                        f"{', '.join(family.rope_types)}){_ROPE_HINTS.get(rope_type, '')}")
    activation = _activation(config, family)
    if activation not in _ACTIVATIONS[family.activation]:
        raise UserError(f"config.json hidden_act {activation!r}: llama.cpp's {family.gguf_arch} graph applies "
                        f"{family.activation}, so the GGUF would compute something else")
    if not family.has_output_tensor and config.get("tie_word_embeddings") is False:
        raise UserError(f"config.json tie_word_embeddings is false, but llama.cpp's {family.gguf_arch} always uses "
                        "the input embedding as the output projection: the separate lm_head cannot be written")
    if model_type == "qwen2" and config.get("use_sliding_window"):
        raise UserError("config.json use_sliding_window is true: llama.cpp's qwen2 graph has no sliding window, "
                        "so long prompts would attend differently; set it false if the model was trained without")
    if model_type == "phi3" and float(rope_parameters(config).get("partial_rotary_factor", 1.0)) != 1.0:
        raise UserError("config.json partial_rotary_factor != 1 is not written for phi3")
    return family


def _activation(config: dict, family: Family) -> str:
    """The MLP activation transformers applies. Gemma 2 reads hidden_activation; Gemma reads hidden_act and turns
    the legacy "gelu" of the official configs into the tanh approximation (as llama.cpp computes it)."""
    if config.get("model_type") == "gemma2":
        return config.get("hidden_activation") or "gelu_pytorch_tanh"
    activation = config.get("hidden_act") or family.activation
    return "gelu_pytorch_tanh" if config.get("model_type") == "gemma" and activation == "gelu" else activation


_ROPE_HINTS = {
    "longrope": ": Phi-3's LongRoPE (per-dimension long/short factors that transformers picks by sequence length "
                "and llama.cpp by context size) is not written by this exporter; use llama.cpp's "
                "convert_hf_to_gguf.py, or a 4k-context Phi-3",
    "yarn": ": YaRN needs llama.cpp's yarn keys, which this exporter does not write yet; use llama.cpp's "
            "convert_hf_to_gguf.py",
    "dynamic": ": dynamic NTK scaling has no llama.cpp equivalent",
}


def add_family_metadata(writer, config: dict, family: Family) -> None:
    """Hyper-parameters beyond the common ones (model.py writes those): rope scaling, experts, Gemma 2's keys."""
    import gguf

    rope = rope_parameters(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    if config.get("num_local_experts"):
        writer.add_expert_count(int(config["num_local_experts"]))
        writer.add_expert_used_count(int(config["num_experts_per_tok"]))
    if config.get("model_type") == "gemma2":
        writer.add_attn_logit_softcapping(float(config.get("attn_logit_softcapping") or 0.0))
        writer.add_final_logit_softcapping(float(config.get("final_logit_softcapping") or 0.0))
        if config.get("sliding_window"):
            writer.add_sliding_window(int(config["sliding_window"]))
            writer.add_sliding_window_pattern(_gemma2_sliding_layers(config))


def _gemma2_sliding_layers(config: dict) -> list[bool]:
    """Which layers use the sliding window: transformers 5 lists them in layer_types; older configs alternate,
    starting with a sliding one (as llama.cpp assumes when it is not told)."""
    num_layers = int(config["num_hidden_layers"])
    layer_types = config.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                                for i in range(num_layers)]
    return [kind == "sliding_attention" for kind in layer_types]


def llama3_rope_factors(config: dict):
    """Llama 3.1's rope frequency scaling as the per-dimension divisors llama.cpp reads from `rope_freqs.weight`
    (ggml divides each rotary frequency by its factor). Transformers (rope_type llama3) keeps high frequencies
    (wavelength below original_context / high_freq_factor), divides low ones (wavelength above original_context /
    low_freq_factor) by `factor`, and blends the band between; the divisor is 1 / (new_freq / old_freq)."""
    import numpy as np

    rope = rope_parameters(config)
    factor = float(rope["factor"])
    low, high = float(rope.get("low_freq_factor", 1.0)), float(rope.get("high_freq_factor", 4.0))
    original_context = float(rope.get("original_max_position_embeddings", 8192))
    dim = head_dim(config)
    base = float(rope["rope_theta"])
    divisors = []
    for i in range(0, dim, 2):
        wavelength = 2 * math.pi * base ** (i / dim)
        if wavelength < original_context / high:
            divisors.append(1.0)
        elif wavelength > original_context / low:
            divisors.append(factor)
        else:
            smooth = (original_context / wavelength - low) / (high - low)
            divisors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(divisors, dtype=np.float32)


def extra_tensors(config: dict) -> dict:
    """Tensors llama.cpp needs that the checkpoint does not hold (name -> fp32 array)."""
    if rope_parameters(config).get("rope_type") == "llama3":
        return {"rope_freqs.weight": llama3_rope_factors(config)}
    return {}


def query_scale(config: dict) -> float:
    """The factor q_proj's rows are multiplied by so that llama.cpp's fixed attention scale gives transformers'.

    Gemma 2 scales queries by 1/sqrt(query_pre_attn_scalar); llama.cpp's gemma2 graph by 1/sqrt(head_dim) (and by
    1/sqrt(hidden / heads) for 46-layer models, the 27B). Rope is linear in q, so scaling q's rows (and bias)
    scales the attention logits by exactly the ratio -- before the soft-cap, as in transformers."""
    if config.get("model_type") != "gemma2" or not config.get("query_pre_attn_scalar"):
        return 1.0
    if int(config["num_hidden_layers"]) == 46:
        llama_cpp_dim = int(config["hidden_size"]) / int(config["num_attention_heads"])
    else:
        llama_cpp_dim = head_dim(config)
    return math.sqrt(llama_cpp_dim / float(config["query_pre_attn_scalar"]))
