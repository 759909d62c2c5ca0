"""How a Hugging Face checkpoint's tensors map onto llama.cpp's GGUF layout (which llama.cpp architecture
each model_type runs as, and what else differs per family, is in arch.py).

* Tensor names come from the gguf package's own map (`gguf.get_tensor_name_map`): model.layers.0.self_attn.q_proj
  -> blk.0.attn_q, model.embed_tokens -> token_embd, lm_head -> output, ...
* Rotary row order: transformers' Llama rotates each head's first half of dimensions against its second half
  (rotate_half), while ggml's rope (normal mode, the one llama.cpp uses for llama) rotates adjacent pairs (2i, 2i+1).
  So the output rows of q_proj and k_proj are reordered, per head, to interleave the two halves: new row 2i is old
  row i, new row 2i+1 is old row i + head_dim/2. Attention scores are unchanged (tests/unit check this). For a LoRA
  adapter the same reordering applies to lora_B's rows (the output side of B @ A); lora_A is untouched.
* Orientation: a GGUF tensor's first dimension (ne0) is the numpy array's last. An nn.Linear weight [out, in] is
  written as is (ne0 = in), PEFT's lora_A [r, in] and lora_B [out, r] likewise, which is what llama.cpp checks:
  lora_a.ne0 == weight.ne0 and lora_b.ne1 == weight.ne1.
"""

from __future__ import annotations

from trainer.errors import UserError
from trainer.jsonfile import read_json_in


def read_hf_config(model_dir: str) -> dict:
    return read_json_in(model_dir, "config.json", f"{model_dir!r} has no config.json: give a Hugging Face model dir")


def rope_parameters(config: dict) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters`; older configs use rope_theta / rope_scaling (whose
    kind was once called `type`)."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    rope["rope_type"] = rope.get("rope_type") or rope.get("type") or "default"
    return rope


def head_dim(config: dict) -> int:
    return int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])


def tensor_name_map(gguf_arch: str, num_layers: int):
    import gguf

    return gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, gguf_arch.upper()), num_layers)


def gguf_name(name_map, hf_module: str) -> str:
    """`model.layers.0.self_attn.q_proj` -> `blk.0.attn_q` (without the .weight suffix)."""
    mapped = name_map.get_name(hf_module)
    if mapped is None:
        raise UserError(f"no GGUF tensor name for {hf_module!r} in llama.cpp's layout of this architecture")
    return mapped


def rotary_heads(config: dict, hf_module: str, adjacent_rope_pairs: bool) -> int | None:
    """The number of heads whose rows must be reordered for ggml's normal-mode rope: q_proj's attention heads,
    k_proj's KV heads; None for every other tensor, and for every tensor of a neox-rope architecture."""
    if not adjacent_rope_pairs:
        return None
    if hf_module.endswith("self_attn.q_proj"):
        return int(config["num_attention_heads"])
    if hf_module.endswith("self_attn.k_proj"):
        return int(config.get("num_key_value_heads") or config["num_attention_heads"])
    return None


def interleave_rotary_rows(rows, num_heads: int):
    """Reorder the rows (dim 0) of a [heads * head_dim, ...] array from rotate-half to adjacent-pair order."""
    size = rows.shape[0]
    if size % (2 * num_heads):
        raise UserError(f"cannot split {size} rows into {num_heads} rotary heads")
    half = size // num_heads // 2
    return rows.reshape(num_heads, 2, half, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def undo_interleave_rotary_rows(rows, num_heads: int):
    """The inverse of `interleave_rotary_rows` (for reading exported files back)."""
    size = rows.shape[0]
    half = size // num_heads // 2
    return rows.reshape(num_heads, half, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
