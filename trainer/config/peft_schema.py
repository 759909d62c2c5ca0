"""The schemas of the `peft` group: one dataclass per method, each with a `name` (schema.py registers them).

Kept apart from schema.py because these fields map one to one onto PEFT's own configs (trainer/adapters.py builds
them) and bitsandbytes' quantisation settings (trainer/model.py); the planner reads them too (launch/plan.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

from trainer.config.checks import non_negative, one_of, require


@dataclass
class NoPeftConfig:
    """Full fine-tuning: every parameter trains."""

    name: str = "none"


# `peft.target_modules` presets besides module names; adapters.py resolves them on the loaded model's decoder layers.
TARGET_PRESETS = ("all-linear", "attention", "mlp")
QUANT_TYPES = ("nf4", "fp4")
QUANT_STORAGE_DTYPES = ("uint8", "bf16", "fp16", "fp32")
COMPUTE_DTYPES = ("auto", "bf16", "fp16", "fp32")


def _check_targets(targets: Any, key: str = "target_modules") -> None:
    if isinstance(targets, str):
        require(targets in TARGET_PRESETS, key, f"{targets!r}: use a list of module names or one of "
                 f"{', '.join(TARGET_PRESETS)}")
    else:
        require(isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) for t in targets),
                 key, f"must be a non-empty list of module names or one of {', '.join(TARGET_PRESETS)}")


def _check_module_names(names: Any, key: str) -> None:
    require(isinstance(names, (list, tuple)) and all(isinstance(n, str) and n for n in names), key,
             "must be a list of module names, e.g. [lm_head]")


@dataclass
class LoraConfig:
    """LoRA: a trainable low-rank update B @ A beside each target linear; the base stays frozen."""

    name: str = "lora"
    r: int = 16  # rank of the update matrices
    alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / r (alpha / sqrt(r) with use_rslora)
    dropout: float = 0.05  # dropout on the adapter's input
    target_modules: Any = "all-linear"  # module names (q_proj, v_proj, ...), all-linear, attention or mlp
    bias: str = "none"  # none | lora_only | all
    use_rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r): high ranks keep learning instead of fading
    modules_to_save: List[str] = field(default_factory=list)  # modules trained in full, saved with the adapter
    # MoE models whose experts are fused 3-D weights (Mixtral in transformers 5, which no module name reaches): LoRA
    # on every expert's gate/up and down weights too, rank r per expert (PEFT's target_parameters). Needs dropout 0.
    experts: bool = False
    # Start from an existing adapter of this shape (a PEFT adapter dir, or a run dir with final/) and train it on
    # (e.g. a second round on new data); null: a fresh adapter.
    init_from: Optional[str] = None

    def __post_init__(self) -> None:
        require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        one_of(self.bias, ("none", "lora_only", "all"), "bias")
        _check_targets(self.target_modules)
        _check_module_names(self.modules_to_save, "modules_to_save")
        # PEFT adds the experts' update to their weights, where no dropout on the input can be applied
        require(not self.experts or self.dropout == 0, "dropout",
                f"must be 0 with peft.experts=true (LoRA on fused expert weights has no input dropout), got "
                f"{self.dropout}")
        require(not self.experts or self.name != "dora", "experts", "DoRA has no form for fused expert weights: use "
                "peft=lora or peft=qlora with peft.experts=true")


@dataclass
class DoraConfig(LoraConfig):
    """DoRA: LoRA on the direction of each weight plus a trainable magnitude per output feature."""

    name: str = "dora"


@dataclass
class QLoraConfig(LoraConfig):
    """QLoRA: LoRA adapters on a base quantised to 4 bits by bitsandbytes at load time."""

    name: str = "qlora"
    quant_type: str = "nf4"  # nf4 (normal-float, for normally distributed weights) | fp4
    double_quant: bool = True  # quantise the per-block scales too (~0.4 bit per weight saved)
    compute_dtype: str = "auto"  # dtype 4-bit weights are dequantised to for matmuls; auto: train.precision's
    # How the packed 4-bit values are stored: uint8 (bitsandbytes' default), or a float dtype (bf16) so that FSDP2
    # and ZeRO-3 can shard and gather them like the other (bf16) parameters of a layer.
    quant_storage: str = "uint8"
    # lm_head in 4 bits as well, as torchtune's QLoRA has it (only where it is not the embedding, i.e. untied): 0.74
    # GiB less for Llama-3.1-8B's 128k x 4096 head; the logits then come from a 4-bit head
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        one_of(self.quant_type, QUANT_TYPES, "quant_type")
        one_of(self.compute_dtype, COMPUTE_DTYPES, "compute_dtype")
        one_of(self.quant_storage, QUANT_STORAGE_DTYPES, "quant_storage")


@dataclass
class IA3Config:
    """IA3: learned vectors that rescale the outputs of attention projections and the inputs of feed-forward ones."""

    name: str = "ia3"
    target_modules: Any = None  # null: PEFT's per-family default (k_proj, v_proj, down_proj for llama); or as lora
    feedforward_modules: Optional[List[str]] = None  # targets scaled on their input; null: the mlp output projections
    modules_to_save: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.target_modules is not None:
            _check_targets(self.target_modules)
        if self.feedforward_modules is not None:
            _check_module_names(self.feedforward_modules, "feedforward_modules")
        _check_module_names(self.modules_to_save, "modules_to_save")


@dataclass
class PromptTuningConfig:
    """Prompt tuning: num_virtual_tokens trainable embeddings prepended to every input; the model stays frozen."""

    name: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init: str = "random"  # random | text (start from the embeddings of init_text's tokens)
    init_text: Optional[str] = None  # e.g. "Answer the question about the creature:"

    def __post_init__(self) -> None:
        require(self.num_virtual_tokens >= 1, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        one_of(self.init, ("random", "text"), "init")
        require(self.init != "text" or bool(self.init_text), "init_text", "is required with init=text")


@dataclass
class PrefixTuningConfig:
    """Prefix tuning: trainable keys and values for num_virtual_tokens positions in every layer's attention."""

    name: str = "prefix_tuning"
    num_virtual_tokens: int = 20
    prefix_projection: bool = False  # learn the prefixes through a 2-layer MLP (steadier, more parameters)
    encoder_hidden_size: int = 0  # hidden size of that MLP; 0: the model's hidden size

    def __post_init__(self) -> None:
        require(self.num_virtual_tokens >= 1, "num_virtual_tokens", f"must be >= 1, got {self.num_virtual_tokens}")
        non_negative(self.encoder_hidden_size, "encoder_hidden_size", "a width", zero="uses the model's hidden size")
