"""Per-GPU and host memory of one training setup: weights, master weights, gradients, optimizer state, the FSDP/ZeRO-3
working set, activations, logits and a margin. Pure Python; see docs/memory-planning.md for the derivations.

Bytes per trainable parameter (T trainable, N = world size; the optimizer's ``o`` is 8 for AdamW, 2 for 8-bit AdamW,
4 for SGD with momentum):

```
                weights (16-bit)   master (fp32)   gradients   optimizer
single / ddp    2 (autocast copy)  4               4 (fp32)    o       ddp: buckets are views of the gradients
fsdp (FSDP2)    - (gathered)       4/N             4/N         o/N     fp32 sharded params, bf16 compute, fp32 reduce
zero1           2                  4/N             2           o/N     DeepSpeed bf16: fp32 master + states sharded
zero2           2                  4/N             2/N         o/N
zero3           2/N                4/N             2/N         o/N
zero3_offload   host 2/N           host 4/N        host 4/N    host o/N   (optimizer step on the CPU, fp32 grads)
fsdp_offload    - (gathered)       host 4/N        host 4/N    host o/N   (fsdp + strategy.cpu_offload)
fp32 training   4 (no master)                      4           o       sharded the same way
```

Frozen weights (PEFT bases) keep their storage format (``PlanInputs.resolved_weight_precision``: a float dtype, or
int8/nf4/fp4 for the decoder-layer linear weights, see ``frozen_weight_bytes``), replicated under
single/ddp/zero1/zero2 and sharded under fsdp/zero3. What a quantised base leaves unquantised (embeddings, norms,
lm_head) stays in the compute dtype, as trainer/model.py keeps it; ``upcast_unquantized`` plans the common recipe that
runs peft's prepare_model_for_kbit_training, which casts those weights to fp32 (``kbit_prepared``).

FSDP2 and ZeRO-3 gather parameters one unit at a time and prefetch the next. Units follow trainer/strategy/fsdp.py:
each decoder layer, and a root unit (embedding, final norm, lm_head) that stays gathered from the embedding lookup to
the loss. The working set is the root plus two decoder layers (current and prefetched) in 16 bits, plus the largest
unit's unsharded 16-bit gradient before its reduce-scatter.

DDP keeps its gradient buckets apart from ``param.grad`` unless ``gradient_as_bucket_view=True``; trainer/strategy/
ddp.py sets it, so gradients are counted once (``DDP_BUCKET_COPY`` models the other setting).

Margin: ``margin_fraction`` (10%) of what is allocated and freed during a step (gradients, gathered units,
activations, logits) for allocator fragmentation and short-lived buffers we do not list (the fp32 gradient partition
at the step, backward's gradient tensors, LoRA's transient dequantised weights). What is allocated once and kept
(weights, master weights, optimizer state, anchors) is packed into the allocator's segments as it arrives and does not
fragment, so it takes no share. On top, fixed bytes (``fixed_margin_bytes``) for what the allocator does not see or
keeps whatever the model: the CUDA context (0.5 GiB: 287 to 426 MiB measured with lazy module loading, PyTorch's
default since 1.13), NCCL's communicator buffers when there is more than one rank (0.5 GiB), and DeepSpeed's gradient
reduce bucket (``reduce_bucket_size``, 5e8 elements in the compute dtype by default, allocated at any model size;
ZeRO-1/2 double-buffer it with ``overlap_comm``): ``deepspeed_bucket_elements``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainer.config.feasibility import experts_refusal, host_embedding_refusal, refusal
from trainer.objectives import CHUNKABLE_MODEL_TYPES, DEFAULT_CHUNK_TOKENS
from trainer.plan.activations import (
    ATTENTION_IMPLEMENTATIONS,
    ActivationSetting,
    effective_attention,
    logits_bytes,
    model_activation_bytes,
)
from trainer.plan.params import LinearModule, ParamCount, count_parameters
from trainer.plan.trainable import TrainableCount, count_trainable, normalise_method

GIB = 1024**3
PRECISIONS = {"bf16-mixed": 2, "fp16-mixed": 2, "fp32": 4}  # training precision -> compute bytes
PRECISION_ALIASES = {"bf16": "bf16-mixed", "fp16": "fp16-mixed"}  # the names train.precision uses
FLOAT_WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
QUANTIZED_WEIGHTS = ("int8", "nf4", "fp4")
WEIGHT_PRECISIONS = (*FLOAT_WEIGHT_BYTES, *QUANTIZED_WEIGHTS)
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adamw_8bit": 2, "paged_adamw": 8, "paged_adamw_8bit": 2, "sgd": 4}
STRATEGIES = ("single", "ddp", "fsdp", "zero1", "zero2", "zero3", "zero3_offload", "fsdp_offload")
SHARDED_PARAM_STRATEGIES = ("fsdp", "zero3", "zero3_offload", "fsdp_offload")
OFFLOAD_STRATEGIES = ("zero3_offload", "fsdp_offload")  # parameters, gradients and optimizer state on the host
DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3", "zero3_offload")
# True would model DDP without gradient_as_bucket_view (buckets a second copy of the grads); trainer/strategy/ddp.py
# sets it, so the buckets are views of the gradients.
DDP_BUCKET_COPY = False
CUDA_CONTEXT_BYTES = GIB // 2
COLLECTIVE_BUFFER_BYTES = GIB // 2  # NCCL's per-communicator buffers, with more than one rank
DEEPSPEED_REDUCE_BUCKET_ELEMENTS = 500_000_000  # reduce_bucket_size: trainer/strategy/deepspeed.py keeps the default
NF4_BLOCK = 64  # bitsandbytes 4-bit: one absmax per 64 weights
NF4_DOUBLE_QUANT_BLOCK = 256  # double quantisation: 8-bit absmax, one fp32 scale per 256 absmax values


@dataclass(frozen=True)
class PlanInputs:
    """One training setup to plan for. ``arch`` holds the Hugging Face config fields (see conf/model/*.yaml)."""

    arch: Mapping[str, Any]
    peft_method: str = "none"  # none (full fine-tune; "full" accepted) | lora | dora | qlora | ia3 | prompt/prefix
    lora_r: int = 16
    lora_dropout: float = 0.0  # > 0 costs each adapter its own input copy and dropout mask (activations)
    target_modules: str | tuple[str, ...] | None = None  # None: all-linear (lora family), peft's defaults (ia3)
    num_virtual_tokens: int = 20
    # LoRA on the fused MoE expert weights too (peft.experts): rank r per expert on gate_up_proj and down_proj
    lora_experts: bool = False
    weight_precision: str | None = None  # frozen base storage; None: as trainer/model.py builds it (see below)
    double_quant: bool = True
    quantize_lm_head: bool = False  # a quantised base's (untied) lm_head quantised too (peft.quantize_lm_head)
    precision: str = "bf16-mixed"  # bf16-mixed | fp16-mixed | fp32 (bf16 and fp16 accepted, as in train.precision)
    optimizer: str = "adamw"
    strategy: str = "single"  # one of STRATEGIES, or auto (resolved by table.choose_auto_strategy)
    nodes: int = 1
    gpus_per_node: int = 1
    micro_batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = True
    # the checkpointed layers' inputs in host memory between forward and backward (train.activation_offloading)
    activation_offloading: bool = False
    # a frozen, untied input embedding kept in host memory, looked up there (train.embedding_on_host)
    embedding_on_host: bool = False
    attention: str = "sdpa"  # eager | sdpa | flash (flash_attention_2 accepted, as in model.attn_implementation)
    # The loss over chunks of this many tokens, as trainer/objectives/ computes it (objective.chunk_tokens); 0:
    # unchunked. Families the trainer does not chunk (and prompt/prefix tuning) are planned unchunked.
    loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # fp32 copies of the trainable weights that `regularize` keeps on the device beside them (trainer/regularize.py):
    # 0 without it, 1 for L2 (the starting weights), 2 for EWC (the starting weights and their Fisher diagonal)
    anchor_copies: int = 0
    # A quantised base's unquantised weights cast to fp32, as peft's prepare_model_for_kbit_training does (the usual
    # Hugging Face QLoRA recipe). The trainer keeps them in the compute dtype.
    upcast_unquantized: bool = False
    # DeepSpeed's gradient reduce buckets in elements: reduce_bucket_size, twice under ZeRO-1/2 with overlap_comm
    deepspeed_bucket_elements: int = DEEPSPEED_REDUCE_BUCKET_ELEMENTS
    margin_fraction: float = 0.10  # of the bytes allocated and freed within a step (module docstring)
    margin_bytes: int | None = None  # fixed part; None: ``fixed_margin_bytes`` of this setup

    def __post_init__(self) -> None:
        object.__setattr__(self, "peft_method", normalise_method(self.peft_method))
        object.__setattr__(self, "precision", PRECISION_ALIASES.get(self.precision, self.precision))
        if self.attention == "flash_attention_2":
            object.__setattr__(self, "attention", "flash")
        if isinstance(self.target_modules, list):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check_choice("precision", self.precision, PRECISIONS)
        _check_choice("optimizer", self.optimizer, OPTIMIZER_STATE_BYTES)
        _check_choice("strategy", self.strategy, (*STRATEGIES, "auto"))
        _check_choice("attention", self.attention, ATTENTION_IMPLEMENTATIONS)
        if self.weight_precision is not None:
            _check_choice("weight_precision", self.weight_precision, WEIGHT_PRECISIONS)
        if self.anchor_copies not in (0, 1, 2):
            raise ValueError(f"anchor_copies must be 0, 1 (L2) or 2 (EWC), got {self.anchor_copies!r}")
        chunk = self.loss_chunk_tokens
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 0:
            raise ValueError(f"loss_chunk_tokens must be an integer >= 0 (0: unchunked), got {chunk!r}")
        for key in ("lora_r", "num_virtual_tokens", "nodes", "gpus_per_node", "micro_batch_size", "seq_len"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.margin_fraction < 1 or (self.margin_bytes is not None and self.margin_bytes < 0):
            raise ValueError("margin_fraction must be in [0, 1) and margin_bytes >= 0")
        weights = self.resolved_weight_precision
        if self.peft_method == "qlora" and weights not in ("nf4", "fp4"):
            raise ValueError(f"peft_method=qlora needs weight_precision nf4 or fp4, got {weights}")
        if self.peft_method == "none" and weights in QUANTIZED_WEIGHTS:
            raise ValueError(f"full fine-tuning cannot train {weights} weights; use a PEFT method (e.g. qlora)")
        if self.strategy == "single" and self.world_size > 1:
            raise ValueError(f"strategy=single runs on one GPU but nodes x gpus_per_node = {self.world_size}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def compute_bytes(self) -> int:
        return PRECISIONS[self.precision]

    @property
    def resolved_weight_precision(self) -> str:
        """Storage of the frozen base. Default: nf4 for qlora; DeepSpeed builds everything in the compute dtype;
        otherwise a frozen base is bf16 under bf16 and fp32 under fp16/fp32 (trainer/model.py build_model)."""
        if self.weight_precision is not None:
            return self.weight_precision
        if self.peft_method == "qlora":
            return "nf4"
        if self.strategy in DEEPSPEED_STRATEGIES:
            return {"bf16-mixed": "bf16", "fp16-mixed": "fp16", "fp32": "fp32"}[self.precision]
        return "bf16" if self.precision == "bf16-mixed" else "fp32"

    def replace(self, **changes: Any) -> PlanInputs:
        return dataclasses.replace(self, **changes)


def _check_choice(key: str, value: Any, choices: Mapping[str, Any] | tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{key} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (and per rank on the host, for offload) of one setup. ``total`` is what must fit the GPU."""

    inputs: PlanInputs
    params: ParamCount
    trainable: TrainableCount
    weights: int  # model weights as the forward reads them (16-bit copies, frozen bases), persistent share
    master_weights: int  # fp32 copies mixed precision keeps of trainable weights
    gradients: int
    optimizer: int
    gathered: int  # FSDP/ZeRO-3 working set: unsharded weights and gradients of the live units
    activations: int
    logits: int
    margin: int
    host_weights: int = 0
    host_master_weights: int = 0
    host_gradients: int = 0
    host_optimizer: int = 0
    anchor: int = 0  # regularize: the starting weights (and EWC's Fisher) in fp32, whole on every rank
    notes: tuple[str, ...] = ()

    GPU_FIELDS = ("weights", "master_weights", "gradients", "optimizer", "anchor", "gathered", "activations", "logits",
                  "margin")
    HOST_FIELDS = ("host_weights", "host_master_weights", "host_gradients", "host_optimizer")

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in self.GPU_FIELDS)

    @property
    def host_total_per_rank(self) -> int:
        return sum(getattr(self, name) for name in self.HOST_FIELDS)

    @property
    def host_total_per_node(self) -> int:
        return self.host_total_per_rank * self.inputs.gpus_per_node

    def gpu_breakdown(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in self.GPU_FIELDS} | {"total": self.total}

    def host_breakdown(self) -> dict[str, int]:
        return {name.removeprefix("host_"): getattr(self, name) for name in self.HOST_FIELDS} | {
            "total_per_rank": self.host_total_per_rank,
            "total_per_node": self.host_total_per_node,
        }

    def fits(self, gpu_memory_gib: float, host_memory_gib: float | None = None) -> bool:
        """Whether the GPU total fits, and (when ``host_memory_gib`` per node is given) the offloaded state too."""
        host_ok = host_memory_gib is None or self.host_total_per_node <= host_memory_gib * GIB
        return self.total <= gpu_memory_gib * GIB and host_ok


def quantized_linear_bytes(module: LinearModule, precision: str, double_quant: bool = True) -> int:
    """Storage of one layer's copy of a bitsandbytes-quantised linear weight (bias excluded: it stays 16-bit).

    nf4/fp4: 0.5 byte per weight plus one absmax per 64 weights: fp32 (4 bytes), or with double quantisation an
    8-bit absmax plus one fp32 scale per 256 absmax values and one fp32 offset. int8 (LLM.int8): 1 byte per weight
    plus one fp32 scale per output row.
    """
    numel = module.in_features * module.out_features
    if precision == "int8":
        return module.copies * (numel + 4 * module.out_features)
    blocks = math.ceil(numel / NF4_BLOCK)
    absmax = blocks + 4 * math.ceil(blocks / NF4_DOUBLE_QUANT_BLOCK) + 4 if double_quant else 4 * blocks
    return module.copies * (math.ceil(numel / 2) + absmax)


def frozen_weight_bytes(
    params: ParamCount, weight_precision: str, compute_bytes: int, double_quant: bool = True,
    quantize_lm_head: bool = False,
) -> int:
    """Bytes of the whole model stored as a frozen base: float formats throughout, or quantised decoder linears
    with everything else (embeddings, norms, lm_head, biases, routers, MoE experts) in the compute dtype; with
    `quantize_lm_head`, an untied lm_head quantised too."""
    if weight_precision in FLOAT_WEIGHT_BYTES:
        return params.total * FLOAT_WEIGHT_BYTES[weight_precision]
    quantized = params.num_layers * sum(
        quantized_linear_bytes(m, weight_precision, double_quant) for m in params.linear_modules if m.quantizable
    )
    unquantized = params.total - params.quantizable
    if quantize_lm_head and params.lm_head:
        quantized += lm_head_quantized_bytes(params, weight_precision, double_quant)
        unquantized -= params.lm_head
    return quantized + unquantized * compute_bytes


def lm_head_quantized_bytes(params: ParamCount, weight_precision: str, double_quant: bool = True) -> int:
    return quantized_linear_bytes(LinearModule("lm_head", params.hidden_size, params.vocab_size), weight_precision,
                                  double_quant)


def _unit_weight_bytes(params: ParamCount, inputs: PlanInputs, trainable: TrainableCount) -> list[int]:
    """16-bit (or quantised) bytes of each FSDP/ZeRO-3 unit as it is gathered for compute: root, then layers."""
    c = inputs.compute_bytes
    if trainable.is_full:
        return [c * unit for unit in params.fsdp_units()]
    one_layer = dataclasses.replace(params, num_layers=1, embedding=0, lm_head=0, final_norm=0)
    # FSDP's param_dtype casts a float base to the compute dtype as it gathers; quantised bases stay quantised.
    stored = inputs.resolved_weight_precision
    gathered_as = stored if stored in QUANTIZED_WEIGHTS else {2: "bf16", 4: "fp32"}[c]
    layer = frozen_weight_bytes(one_layer, gathered_as, c, inputs.double_quant)
    layer += c * _adapter_params_per_layer(params, trainable)
    root = c * params.fsdp_units()[0]
    if inputs.quantize_lm_head and stored in QUANTIZED_WEIGHTS and params.lm_head:
        root += lm_head_quantized_bytes(params, stored, inputs.double_quant) - c * params.lm_head
    return [root, *([layer] * params.num_layers)]


def _gathered_bytes(params: ParamCount, inputs: PlanInputs, trainable: TrainableCount) -> int:
    root, *layers = _unit_weight_bytes(params, inputs, trainable)
    if trainable.is_full:
        largest_grad = inputs.compute_bytes * max(params.fsdp_units())
    else:
        largest_grad = inputs.compute_bytes * _adapter_params_per_layer(params, trainable)
    return root + sum(sorted(layers, reverse=True)[:2]) + largest_grad


def _adapter_params_per_layer(params: ParamCount, trainable: TrainableCount) -> int:
    """Adapters and IA3 vectors live in the decoder layers; prompt/prefix embeddings live outside them."""
    return trainable.total // params.num_layers if trainable.targeted else 0


def kbit_prepared(inputs: PlanInputs) -> bool:
    """A quantised base prepared by peft's prepare_model_for_kbit_training (``upcast_unquantized``), which casts every
    float parameter it leaves unquantised (embeddings, norms, lm_head, MoE experts) to fp32. The trainer does not
    (trainer/model.py); DeepSpeed builds everything in the compute dtype in any case."""
    return (inputs.upcast_unquantized and inputs.resolved_weight_precision in QUANTIZED_WEIGHTS
            and inputs.strategy not in DEEPSPEED_STRATEGIES)


def effective_loss_chunk_tokens(inputs: PlanInputs, params: ParamCount, trainable: TrainableCount) -> int:
    """The chunk the trainer's loss really uses: 0 (unchunked) where trainer/objectives/sft.py falls back."""
    if trainable.method in ("prompt_tuning", "prefix_tuning") or params.model_type not in CHUNKABLE_MODEL_TYPES:
        return 0
    if inputs.strategy in ("zero3", "zero3_offload"):  # lm_head is partitioned between forward and recomputation
        return 0
    return inputs.loss_chunk_tokens


def _check_combination(inputs: PlanInputs) -> None:
    """Reject setups the backends cannot run, naming the key to change."""
    if inputs.strategy == "auto":
        raise ValueError("strategy=auto has no memory of its own: resolve it with choose_auto_strategy first")
    if inputs.strategy == "zero3_offload" and inputs.optimizer != "adamw":
        raise ValueError(
            f"optimizer={inputs.optimizer} cannot be offloaded: ZeRO offload runs DeepSpeed's CPU Adam; use adamw"
        )
    refused = refusal(inputs.strategy, inputs.peft_method, inputs.optimizer)
    if not refused and inputs.lora_experts:
        refused = experts_refusal(inputs.strategy)
    if refused:
        raise ValueError(f"{refused[0]}: {refused[1]}")
    if inputs.resolved_weight_precision == "int8" and inputs.strategy in SHARDED_PARAM_STRATEGIES:
        raise ValueError(f"strategy={inputs.strategy} cannot shard bitsandbytes int8 weights; use nf4 or zero2")


def estimate_memory(inputs: PlanInputs) -> MemoryEstimate:
    """Estimate per-GPU and host memory for ``inputs`` (formulas: module docstring and activations.py)."""
    _check_combination(inputs)
    params = count_parameters(inputs.arch)
    trainable = count_trainable(
        params,
        inputs.peft_method,
        r=inputs.lora_r,
        target_modules=inputs.target_modules,
        num_virtual_tokens=inputs.num_virtual_tokens,
        experts=inputs.lora_experts,
    )
    if inputs.embedding_on_host:
        refused = host_embedding_refusal(inputs.strategy, trainable.method, params.tied_embeddings)
        if refused:
            raise ValueError(f"{refused[0]}: {refused[1]}")
    c = inputs.compute_bytes
    notes = list(params.notes)
    if trainable.unmatched:
        notes.append(f"target_modules not found in {params.model_type}: {', '.join(trainable.unmatched)}")
    gpu, host = _model_state_bytes(inputs, params, trainable)
    gathered = _gathered_bytes(params, inputs, trainable) if inputs.strategy in SHARDED_PARAM_STRATEGIES else 0

    seq_len = inputs.seq_len + (inputs.num_virtual_tokens if trainable.method == "prompt_tuning" else 0)
    mixed = inputs.precision != "fp32"
    autocast = mixed and inputs.strategy in ("single", "ddp")
    fp32_base = not trainable.is_full and inputs.resolved_weight_precision == "fp32"
    kbit = kbit_prepared(inputs)
    setting = ActivationSetting(c, inputs.attention, autocast=autocast, lora_dropout=inputs.lora_dropout > 0,
                                fp32_residual=autocast and (trainable.is_full or fp32_base or kbit),
                                fp32_mlp=autocast and kbit,
                                loss_chunk_tokens=effective_loss_chunk_tokens(inputs, params, trainable))
    if effective_attention(params, inputs.attention) != inputs.attention:
        notes.append("transformers has no SDPA for gemma2: counted eager attention (set attention=flash to avoid)")
    offload = inputs.activation_offloading and inputs.gradient_checkpointing
    activations = model_activation_bytes(
        params, trainable, seq_len, inputs.micro_batch_size, setting, inputs.gradient_checkpointing, offload
    )
    logits = logits_bytes(params, seq_len, inputs.micro_batch_size, setting)
    notes.extend(_setup_notes(inputs, trainable))

    # regularize runs where every trainable weight is whole on each rank (single, ddp): so is its anchor
    anchor = 4 * inputs.anchor_copies * trainable.total
    within_step = gpu["gradients"] + gathered + activations + logits
    margin = inputs.margin_fraction * within_step + fixed_margin_bytes(inputs)
    return MemoryEstimate(
        inputs=inputs,
        params=params,
        trainable=trainable,
        **{name: round(value) for name, value in gpu.items()},
        gathered=round(gathered),
        anchor=anchor,
        activations=activations,
        logits=logits,
        margin=round(margin),
        **{f"host_{name}": round(value) for name, value in host.items()},
        notes=tuple(notes),
    )


def fixed_margin_bytes(inputs: PlanInputs) -> int:
    """The margin's fixed part: the CUDA context, NCCL's buffers with more than one rank, DeepSpeed's reduce bucket
    (module docstring). ``inputs.margin_bytes`` overrides it."""
    if inputs.margin_bytes is not None:
        return inputs.margin_bytes
    fixed = CUDA_CONTEXT_BYTES
    if inputs.world_size > 1:
        fixed += COLLECTIVE_BUFFER_BYTES
    if inputs.strategy in DEEPSPEED_STRATEGIES:
        fixed += inputs.deepspeed_bucket_elements * inputs.compute_bytes
    return fixed


def _model_state_bytes(
    inputs: PlanInputs, params: ParamCount, trainable: TrainableCount
) -> tuple[dict[str, float], dict[str, float]]:
    """Persistent weights, master weights, gradients and optimizer state: (per GPU, per rank on the host)."""
    n, c, strategy = inputs.world_size, inputs.compute_bytes, inputs.strategy
    mixed = inputs.precision != "fp32"
    frozen = 0
    if not trainable.is_full:
        # What a quantised base leaves unquantised (embeddings, norms, lm_head): compute dtype, fp32 if k-bit prepared.
        remainder = 4 if kbit_prepared(inputs) else c
        frozen = frozen_weight_bytes(params, inputs.resolved_weight_precision, remainder, inputs.double_quant,
                                     inputs.quantize_lm_head)
    host_embedding = 0
    if inputs.embedding_on_host:  # refused (estimate_memory) where the embedding trains, is tied or is sharded
        stored = inputs.resolved_weight_precision
        host_embedding = params.embedding * FLOAT_WEIGHT_BYTES.get(stored, 4 if kbit_prepared(inputs) else c)
        frozen -= host_embedding
    t = trainable.total
    copy_bytes, master_bytes = (2, 4) if mixed else (4, 0)
    # torch autocast and FSDP2 (reduce_dtype fp32) keep fp32 gradients; DeepSpeed bf16 keeps 16-bit ones.
    grad_bytes = 4 if strategy in ("single", "ddp", "fsdp", "fsdp_offload") or not mixed else 2
    shard_params = strategy in SHARDED_PARAM_STRATEGIES
    shard_grads = strategy in ("fsdp", "zero2", "zero3", *OFFLOAD_STRATEGIES)
    shard_states = strategy not in ("single", "ddp")

    # The persistent copy of the trainable weights the forward reads. FSDP2 in mixed precision keeps only the fp32
    # shards (counted as master weights) and casts to bf16 when it gathers a unit.
    if strategy in ("fsdp", "fsdp_offload"):
        trainable_copy = 0 if mixed else copy_bytes * t / n
    elif shard_params:
        trainable_copy = copy_bytes * t / n
    else:
        trainable_copy = copy_bytes * t
    bucket_copies = 2 if strategy == "ddp" and DDP_BUCKET_COPY else 1
    gpu = {
        "weights": frozen / (n if shard_params else 1) + trainable_copy,
        "master_weights": master_bytes * t / (n if shard_states else 1),
        "gradients": bucket_copies * grad_bytes * t / (n if shard_grads else 1),
        "optimizer": OPTIMIZER_STATE_BYTES[inputs.optimizer] * t / (n if shard_states else 1),
    }
    host = dict.fromkeys(gpu, 0.0) | {"weights": float(host_embedding)}
    if strategy in OFFLOAD_STRATEGIES:
        # DeepSpeed keeps each rank's partition of the 16-bit params, fp32 master, fp32 grads and Adam states on
        # the host; FSDP2's CPUOffloadPolicy its fp32 shards (or a frozen base's stored ones), fp32 gradients and
        # the optimizer, whose step runs on the CPU. The GPU holds only the gathered working set.
        host = {**gpu, "gradients": 4 * t / n}
        gpu = dict.fromkeys(gpu, 0.0)
    return gpu, host


def _setup_notes(inputs: PlanInputs, trainable: TrainableCount) -> list[str]:
    notes = []
    if inputs.optimizer.startswith("paged_"):
        notes.append("paged optimizer: its state can page out to host memory under pressure; counted on the GPU")
    if inputs.strategy == "ddp" and DDP_BUCKET_COPY:
        notes.append("ddp: gradient buckets hold a second copy of the gradients (gradient_as_bucket_view=False)")
    if trainable.method == "dora":
        notes.append("DoRA's extra activations (weight-norm terms) are not modelled; expect more than LoRA")
    if trainable.method == "prefix_tuning":
        notes.append("prefix tuning lengthens every layer's keys and values by num_virtual_tokens (not counted)")
    if inputs.precision == "fp16-mixed" and not trainable.is_full:
        notes.append("fp16-mixed: keep trainable adapters in fp32 for the loss scaler")
    return notes
