"""Exact parameter counts from a Hugging Face ``config.json``, without torch and without weights.

The count follows the module tree that ``transformers`` builds for each decoder-only family:

```
head_dim = head_dim (when the config sets it) or hidden_size // num_attention_heads
q_dim    = num_attention_heads * head_dim          kv_dim = num_key_value_heads * head_dim
attn     = H*q_dim + 2*H*kv_dim + q_dim*H          (+ biases: qwen2 q/k/v; llama/gemma when attention_bias)
mlp      = 3*H*I                                   (phi3 fuses gate+up into one 2I-wide linear: same total)
           mixtral: E experts of 3*H*I each, plus a router of E*H
norms    = 2*H per layer (gemma2: 4*H; pre/post attention and pre/post feed-forward)
total    = V*H (embedding) + L*(attn + mlp + router + norms) + H (final norm) + V*H (lm_head, 0 when tied)
```

Tied embeddings come from ``tie_word_embeddings``; when the key is absent we use the config class's default, which is
True for gemma/gemma2 (their shipped configs omit the key) and False for the other families.

Unknown ``model_type`` values are counted with the llama layout and flagged (``ParamCount.assumed_layout``, with a
note saying so) rather than rejected: the planner is an estimate and most new decoder families are llama-shaped.
Missing or non-integer size fields raise ``ValueError`` naming the key.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Families whose module layout is modelled exactly (tested against the real transformers classes).
KNOWN_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "gemma", "gemma2", "phi3")

# Config classes whose tie_word_embeddings default is True; their configs usually leave the key out.
_TIED_BY_DEFAULT = frozenset({"gemma", "gemma2"})

# Norm implementations differ in what they keep for backward (see activations.py); gemma's upcasts everything.
_GEMMA_STYLE_NORMS = frozenset({"gemma", "gemma2"})


def ties_embeddings(arch: Mapping[str, Any]) -> bool:
    """Whether lm_head is the input embedding: tie_word_embeddings, or its config class's default when absent."""
    return bool(arch.get("tie_word_embeddings", arch.get("model_type") in _TIED_BY_DEFAULT))


@dataclass(frozen=True)
class LinearModule:
    """One linear projection inside a decoder layer, named as in the Hugging Face module tree.

    ``copies`` is the number of experts for MoE expert projections (1 otherwise); every count on this class is
    per decoder layer and already multiplied by ``copies``.
    """

    name: str
    in_features: int
    out_features: int
    bias: bool = False
    copies: int = 1
    role: str = "attention"  # attention | mlp | router
    aliases: tuple[str, ...] = ()  # other names a target list may use for this module
    # Aliases that must be targeted together: peft maps Mixtral's w1 and w3 onto the fused gate_up_proj and
    # refuses one without the other.
    aliases_fused: bool = False
    # peft gives a fused projection rank r * (number of projections fused) so it matches two separate adapters.
    rank_multiplier: int = 1
    # bitsandbytes only replaces nn.Linear; transformers 5 keeps MoE experts as 3-D parameters it leaves alone.
    quantizable: bool = True

    @property
    def weight_params(self) -> int:
        return self.copies * self.in_features * self.out_features

    @property
    def num_params(self) -> int:
        return self.weight_params + (self.copies * self.out_features if self.bias else 0)

    def matches(self, target: str) -> bool:
        return target == self.name or target in self.aliases


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one architecture, with the per-layer pieces the memory model needs."""

    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_experts: int  # 1 for dense models
    num_experts_per_tok: int  # 1 for dense models
    embedding: int
    lm_head: int  # 0 when tied to the embedding
    final_norm: int
    attention_per_layer: int  # q/k/v/o weights and biases
    mlp_per_layer: int  # all experts for MoE
    router_per_layer: int
    norm_per_layer: int
    norms_per_layer: int  # how many norm modules a layer has (2, or 4 for gemma2)
    linear_modules: tuple[LinearModule, ...]
    tied_embeddings: bool
    gemma_style_norms: bool
    final_logit_softcapping: bool
    assumed_layout: bool  # True when model_type is unknown and the llama layout was assumed
    notes: tuple[str, ...] = ()

    @property
    def q_dim(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def per_layer(self) -> int:
        return self.attention_per_layer + self.mlp_per_layer + self.router_per_layer + self.norm_per_layer

    @property
    def decoder(self) -> int:
        return self.num_layers * self.per_layer

    @property
    def total(self) -> int:
        return self.embedding + self.decoder + self.final_norm + self.lm_head

    @property
    def non_embedding(self) -> int:
        """Total minus embedding and lm_head: the figure model cards call "non-embedding" parameters."""
        return self.total - self.embedding - self.lm_head

    @property
    def quantizable(self) -> int:
        """Weights that bitsandbytes quantises: the nn.Linear weights inside decoder layers.

        Biases, norms, embeddings, lm_head, MoE routers and (transformers 5) fused MoE experts stay in the compute
        dtype.
        """
        return self.num_layers * sum(m.weight_params for m in self.linear_modules if m.quantizable)

    @property
    def active(self) -> int:
        """Parameters used per token: for MoE only ``num_experts_per_tok`` of the experts run."""
        inactive_experts = self.num_experts - self.num_experts_per_tok
        return self.total - self.num_layers * self.mlp_per_layer * inactive_experts // self.num_experts

    def fsdp_units(self) -> tuple[int, ...]:
        """Parameter counts of the units FSDP2/ZeRO-3 gather: the root, then one per decoder layer.

        As trainer/strategy/fsdp.py wraps the model, each decoder layer is its own unit and the root unit holds
        the embedding, the final norm and lm_head (which is the embedding again when tied).
        """
        return (self.embedding + self.final_norm + self.lm_head, *([self.per_layer] * self.num_layers))

    def trainable_for(self, peft_method: str, **options: Any):
        """Trainable parameters for a PEFT method; see ``trainer.plan.trainable.count_trainable`` for options."""
        from trainer.plan.trainable import count_trainable  # local import: trainable.py imports this module

        return count_trainable(self, peft_method, **options)


def load_arch(path_or_dir: str | Path) -> dict[str, Any]:
    """Read a Hugging Face ``config.json`` (given the file or the checkpoint directory holding it)."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}: pass a checkpoint directory or its config.json")
    with path.open(encoding="utf-8") as handle:
        arch = json.load(handle)
    if not isinstance(arch, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return arch


def _positive_int(arch: Mapping[str, Any], key: str, default: int | None = None) -> int:
    value = arch.get(key, default)
    if value is None:
        raise ValueError(f"arch.{key} is required to count parameters (model_type={arch.get('model_type')!r})")
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"arch.{key} must be a positive integer, got {value!r}")
    return value


def _linear_modules(arch: Mapping[str, Any], model_type: str, sizes: dict[str, int]) -> tuple[LinearModule, ...]:
    hidden, inter, q_dim, kv_dim = sizes["hidden"], sizes["inter"], sizes["q_dim"], sizes["kv_dim"]
    experts = sizes["experts"]
    qkv_bias = model_type == "qwen2" or bool(arch.get("attention_bias", False))
    # qwen2 hard-codes biases on q/k/v only; llama and gemma put attention_bias on o_proj as well.
    o_bias = model_type != "qwen2" and bool(arch.get("attention_bias", False))
    mlp_bias = bool(arch.get("mlp_bias", False))

    if model_type == "phi3":
        return (
            LinearModule("qkv_proj", hidden, q_dim + 2 * kv_dim),
            LinearModule("o_proj", q_dim, hidden),
            LinearModule("gate_up_proj", hidden, 2 * inter, role="mlp"),
            LinearModule("down_proj", inter, hidden, role="mlp"),
        )
    attention = (
        LinearModule("q_proj", hidden, q_dim, qkv_bias),
        LinearModule("k_proj", hidden, kv_dim, qkv_bias),
        LinearModule("v_proj", hidden, kv_dim, qkv_bias),
        LinearModule("o_proj", q_dim, hidden, o_bias),
    )
    if model_type == "mixtral":
        # The transformers 5 layout: a router module and per-layer 3-D expert parameters, gate and up fused.
        # Target lists may use the transformers 4 names (w1, w3, w2) that peft converts.
        experts_kw = {"copies": experts, "role": "mlp", "quantizable": False}
        return attention + (
            LinearModule("gate", hidden, experts, role="router", quantizable=False),
            LinearModule("gate_up_proj", hidden, 2 * inter, aliases=("w1", "w3"), aliases_fused=True,
                         rank_multiplier=2, **experts_kw),
            LinearModule("down_proj", inter, hidden, aliases=("w2",), **experts_kw),
        )
    return attention + (
        LinearModule("gate_proj", hidden, inter, mlp_bias, role="mlp"),
        LinearModule("up_proj", hidden, inter, mlp_bias, role="mlp"),
        LinearModule("down_proj", inter, hidden, mlp_bias, role="mlp"),
    )


def count_parameters(arch: Mapping[str, Any]) -> ParamCount:
    """Count the parameters of the architecture described by Hugging Face config fields (``arch``)."""
    model_type = arch.get("model_type")
    if not isinstance(model_type, str) or not model_type:
        raise ValueError("arch.model_type is required (e.g. 'llama'); it selects the module layout to count")
    hidden = _positive_int(arch, "hidden_size")
    vocab = _positive_int(arch, "vocab_size")
    layers = _positive_int(arch, "num_hidden_layers")
    inter = _positive_int(arch, "intermediate_size")
    heads = _positive_int(arch, "num_attention_heads")
    kv_heads = _positive_int(arch, "num_key_value_heads", heads)
    # An explicit head_dim wins: gemma-2-9b has 16 heads of 256 while hidden_size/heads would give 224.
    head_dim = arch.get("head_dim") or hidden // heads
    head_dim = _positive_int({"head_dim": head_dim}, "head_dim")
    is_moe = model_type == "mixtral" or "num_local_experts" in arch
    experts = _positive_int(arch, "num_local_experts") if is_moe else 1
    experts_per_tok = _positive_int(arch, "num_experts_per_tok") if is_moe else 1

    notes: list[str] = []
    assumed = model_type not in KNOWN_MODEL_TYPES
    if assumed:
        notes.append(f"model_type {model_type!r} is not modelled exactly; counted with the llama layout")
    if is_moe:
        notes.append("MoE experts are 3-D parameters in transformers 5: bitsandbytes leaves them unquantised")
    sizes = {"hidden": hidden, "inter": inter, "q_dim": heads * head_dim, "kv_dim": kv_heads * head_dim}
    sizes["experts"] = experts
    modules = _linear_modules(arch, "mixtral" if is_moe and model_type != "phi3" else model_type, sizes)

    tied = ties_embeddings(arch)
    norms_per_layer = 4 if model_type == "gemma2" else 2
    return ParamCount(
        model_type=model_type,
        num_layers=layers,
        hidden_size=hidden,
        vocab_size=vocab,
        intermediate_size=inter,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        num_experts=experts,
        num_experts_per_tok=experts_per_tok,
        embedding=vocab * hidden,
        lm_head=0 if tied else vocab * hidden,
        final_norm=hidden,
        attention_per_layer=sum(m.num_params for m in modules if m.role == "attention"),
        mlp_per_layer=sum(m.num_params for m in modules if m.role == "mlp"),
        router_per_layer=sum(m.num_params for m in modules if m.role == "router"),
        norm_per_layer=norms_per_layer * hidden,
        norms_per_layer=norms_per_layer,
        linear_modules=modules,
        tied_embeddings=tied,
        gemma_style_norms=model_type in _GEMMA_STYLE_NORMS,
        final_logit_softcapping=bool(arch.get("final_logit_softcapping")),
        assumed_layout=assumed,
        notes=tuple(notes),
    )
