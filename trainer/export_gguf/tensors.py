"""A checkpoint's tensors as llama.cpp's: renamed, and changed where llama.cpp's graph computes differently from
transformers (the reasons are in arch.py and layout.py).

Mixtral's experts come in two layouts: per expert (`block_sparse_moe.experts.E.w1/w2/w3`, how checkpoints are
saved) or fused 3-D parameters (`mlp.experts.gate_up_proj` [E, 2*ff, hidden] with the gate half first, and
`mlp.experts.down_proj` [E, hidden, ff], transformers 5's in-memory layout, which a full fine-tune's checkpoint may
hold). Both become llama.cpp's stacked `ffn_gate_exps` / `ffn_up_exps` [E, ff, hidden] and `ffn_down_exps`
[E, hidden, ff].
"""

from __future__ import annotations

import re

from trainer.errors import UserError
from trainer.export_gguf.arch import Family, extra_tensors, query_scale
from trainer.export_gguf.layout import gguf_name, interleave_rotary_rows, rotary_heads, tensor_name_map

_PER_EXPERT = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)")
_EXPERT_PART = {"w1": "ffn_gate_exps", "w2": "ffn_down_exps", "w3": "ffn_up_exps"}


def iter_gguf_tensors(config: dict, family: Family, weights):
    """(GGUF name, fp32 array) for every tensor llama.cpp reads, from `weights`' (HF name, fp32 array) pairs."""
    names = tensor_name_map(family.gguf_arch, int(config["num_hidden_layers"]))
    experts = _ExpertStacker(int(config.get("num_local_experts") or 0))
    skip_head = bool(config.get("tie_word_embeddings", False)) or not family.has_output_tensor
    for name, array in weights:
        if name.endswith("rotary_emb.inv_freq") or (skip_head and name == "lm_head.weight"):
            continue  # llama.cpp computes rotary frequencies itself; a tied head reuses token_embd
        fused = _FUSED_EXPERTS.fullmatch(name)
        if fused:
            yield from _split_fused_experts(int(fused.group(1)), fused.group(2), array)
            continue
        per_expert = _PER_EXPERT.fullmatch(name)
        if per_expert:
            yield from experts.add(int(per_expert.group(1)), int(per_expert.group(2)), per_expert.group(3), array)
            continue
        module, _, suffix = name.rpartition(".")
        yield f"{gguf_name(names, module)}.{suffix}", adapt_tensor(config, family, module, array)
    experts.check_complete()
    yield from extra_tensors(config).items()


def adapt_tensor(config: dict, family: Family, module: str, array):
    """What llama.cpp's graph needs in place of transformers' tensor of `module` (a weight or a bias). Everything
    here acts on output rows, so it applies to a LoRA pair's B as it does to the merged weight."""
    heads = rotary_heads(config, module, family.adjacent_rope_pairs)
    if heads is not None:
        array = interleave_rotary_rows(array, heads)
    if module.endswith("self_attn.q_proj"):
        scale = query_scale(config)
        array = array * scale if scale != 1.0 else array
    if family.norm_plus_one and module.endswith("norm"):
        array = array + 1.0  # transformers' Gemma RMSNorm computes x_normed * (1 + w); llama.cpp x_normed * w
    return array


def _split_fused_experts(layer: int, part: str, array):
    if part == "down_proj":
        yield f"blk.{layer}.ffn_down_exps.weight", array
        return
    half = array.shape[1] // 2
    yield f"blk.{layer}.ffn_gate_exps.weight", array[:, :half]
    yield f"blk.{layer}.ffn_up_exps.weight", array[:, half:]


class _ExpertStacker:
    """Collects one layer's per-expert matrices and yields each stacked tensor once all its experts are in."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.pending: dict[tuple[int, str], dict[int, object]] = {}

    def add(self, layer: int, expert: int, part: str, array):
        import numpy as np

        if not self.num_experts:
            raise UserError(f"the checkpoint holds expert weights (layer {layer}) but config.json has no "
                            "num_local_experts")
        slot = self.pending.setdefault((layer, part), {})
        slot[expert] = array
        if len(slot) == self.num_experts:
            del self.pending[(layer, part)]
            yield f"blk.{layer}.{_EXPERT_PART[part]}.weight", np.stack([slot[e] for e in range(self.num_experts)])

    def check_complete(self) -> None:
        if self.pending:
            (layer, part), slot = next(iter(self.pending.items()))
            raise UserError(f"layer {layer} has {len(slot)} of {self.num_experts} experts' {part} weights: the "
                            "checkpoint is incomplete")
