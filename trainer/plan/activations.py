"""Activation memory: the tensors the forward pass keeps for backward, in bytes per GPU.

The starting point is Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
which counts, for one GPT layer with 16-bit activations and no tensor/sequence parallelism,

    s*b*h*(34 + 5*a*s/h)  bytes            (``korthikanti_layer_bytes``)

(s sequence length, b micro batch, h hidden size, a attention heads). 34*s*b*h is everything linear in s: layer-norm
and linear-layer inputs, Q/K/V, the 4h-wide MLP intermediates, dropout masks. 5*a*s^2*b is the attention score
matrix: softmax output (2 bytes), dropout mask (1) and dropout output (2).

``layer_activation_bytes`` redoes that count tensor by tensor for the Hugging Face decoder layers we plan for, so that
it follows their real shapes, and checks it against the tensors autograd actually saves (tests/unit):

* grouped-query attention keeps K and V at ``kv_dim`` width (``q_dim`` width under eager attention, which repeats
  them); there is no dropout (every config here has attention_dropout 0), so no masks;
* a gated MLP (SwiGLU/GeGLU) keeps four I-wide tensors: gate output, activation output, up output, and their product
  (the down projection's input): ``4*c*I`` instead of GPT's ``2*c*4h``;
* RMSNorm upcasts to fp32: the fp32 input (4 bytes) is kept, plus the normalised value (c bytes; 4 for gemma, whose
  norm multiplies in fp32) when the norm weight trains;
* attention: eager keeps the fp32 softmax output and its c-byte copy, ``a*s*(4 + c)`` per token; SDPA and
  flash-attention recompute the scores in backward and keep only their output and an fp32 log-sum-exp (``4*a``):
  this removes Korthikanti's ``5*a*s/h`` term, which is what makes long sequences affordable;
* a linear layer keeps its input only when its weight trains or an adapter reads the input (frozen linears need only
  their weight for the input gradient). Under autocast every trainable linear gets its own cast copy of its input,
  so q/k/v keep three copies where pure bf16 keeps one; LoRA dropout also gives each adapter its own input copy,
  plus a dropout mask;
* MoE: every token visits ``k = num_experts_per_tok`` experts, each keeping the routed input and output copies
  (2*c*h) and the gated-MLP tensors (4*c*I). LoRA on the experts (transformers 5 / peft 0.21) materialises
  ``W + B@A`` per expert and the grouped matmul keeps it: one 16-bit copy of the layer's expert weights per layer;
* phi3's fused qkv: v is a view that keeps the whole qkv output, and the attention output is copied for o_proj.
* QLoRA as trainer/model.py builds it keeps the unquantised weights (norms, embeddings) in the compute dtype, so its
  residual stream and MLP tensors are 16-bit like LoRA's (peft's prepare_model_for_kbit_training would upcast them to
  fp32, which made the residual stream and the gate/up outputs fp32; the trainer no longer calls it).

With full activation checkpointing (one checkpoint per decoder layer) only each layer's input survives the forward,
``residual_bytes*s*b*h`` per layer (2*s*b*h in bf16), and backward recomputes one layer at a time, so one layer's full
activations are added once.

The logits are separate (``logits_bytes``). The loss upcasts logits to fp32 and log-softmax keeps an fp32 result; the
peak comes at the start of backward, when that fp32 result, the fp32 gradient nll_loss hands back and the fp32 gradient
log-softmax returns are alive together: 12 bytes per logit (+c for gemma2's final logit soft-capping, whose tanh output
is kept). The model's own 16-bit logits are no longer referenced by then: the objective returns only the loss (an
earlier recipe kept them alive through backward: c + 12). Unchunked, that is b*s*V logits: for 128k-256k vocabularies
more than all the checkpointed layer inputs together. The trainer's loss (trainer/objectives/) runs lm_head and the
cross-entropy over ``chunk_tokens`` positions at a time and recomputes each chunk in backward, so only one chunk's
logits exist at a time: ``chunk_tokens*V*12``; it keeps the final hidden states for the recomputation instead (``c*h``
per token, counted in ``head_activation_bytes``). Measured on CPU with torch's allocation events
(tests/integration/test_plan_vs_measured.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.plan.params import LinearModule, ParamCount
from trainer.plan.trainable import TrainableCount, ia3_scales_output, module_saves_input

ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", "flash")
FP32_BYTES = 4


def korthikanti_layer_bytes(seq_len: int, micro_batch: int, hidden: int, num_heads: int) -> int:
    """Korthikanti et al. 2022: s*b*h*(34 + 5*a*s/h) bytes for one GPT layer with 16-bit activations."""
    return 34 * seq_len * micro_batch * hidden + 5 * num_heads * seq_len * seq_len * micro_batch


@dataclass(frozen=True)
class ActivationSetting:
    """How the training setup shapes activations (derived from the strategy and precision in memory.py)."""

    compute_bytes: int  # 2 for bf16/fp16 compute, 4 for fp32
    attention: str = "sdpa"  # eager | sdpa | flash
    # Trainable weights stay fp32 and the forward runs under autocast (single/ddp mixed precision): with full
    # fine-tuning the residual stream is then fp32, and every trainable linear (or fp32 adapter) keeps its own cast
    # copy of its input. FSDP2 and DeepSpeed run the forward on 16-bit weights, so inputs are shared.
    autocast: bool = False
    # LoRA dropout > 0 gives every adapter its own dropped-out input plus a mask (a bool per element on CUDA; CPU
    # kernels keep the mask in the activation dtype).
    lora_dropout: bool = False
    dropout_mask_bytes: int = 1
    # fp32 weights at the bottom of the model (full fine-tuning under autocast, or a base kept in fp32) make the
    # residual stream fp32, which is what checkpointed layers then keep as their inputs. None: derive it.
    fp32_residual: bool | None = None
    # A 4/8-bit base whose unquantised weights are fp32 (peft's prepare_model_for_kbit_training) under autocast:
    # bitsandbytes' linears return their input's dtype, so on the fp32 residual stream the gated MLP's gate and up
    # outputs, and the activation computed from them, are fp32. The trainer keeps them 16-bit (trainer/model.py);
    # this models the peft recipe (benchmarks/memory.py's baseline).
    fp32_mlp: bool = False
    # The loss over chunks of this many tokens (trainer/objectives/); 0: unchunked, all b*s logits at once.
    loss_chunk_tokens: int = 0

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION_IMPLEMENTATIONS)}, got {self.attention!r}")

    def residual_bytes(self, trainable: TrainableCount) -> int:
        """Bytes per element of the residual stream (what a checkpointed layer keeps as its input)."""
        fp32_residual = self.autocast and trainable.is_full if self.fp32_residual is None else self.fp32_residual
        return FP32_BYTES if fp32_residual else self.compute_bytes


def effective_attention(params: ParamCount, attention: str) -> str:
    """transformers 5 refuses SDPA for Gemma-2 (its logit soft-capping); such models run eager attention."""
    return "eager" if params.model_type == "gemma2" and attention == "sdpa" else attention


def _norm_bytes(params: ParamCount, trainable: TrainableCount, setting: ActivationSetting) -> int:
    """Bytes per element one RMSNorm keeps: the fp32 input, plus the normalised value when its weight trains."""
    if not trainable.is_full:
        return FP32_BYTES
    if params.gemma_style_norms or setting.autocast:
        return 2 * FP32_BYTES
    return FP32_BYTES + setting.compute_bytes


def _input_group_bytes(
    modules: list[LinearModule], width: int, trainable: TrainableCount, setting: ActivationSetting, cast: bool
) -> int:
    """Bytes per token kept for a set of linears that read the same input of ``width`` features.

    One shared copy, unless each module keeps its own (``cast``, or adapters behind LoRA dropout).
    """
    savers = [m for m in modules if module_saves_input(trainable, m)]
    if not savers:
        return 0
    per_module = setting.compute_bytes * width
    if _adapter_dropout(trainable, setting):
        return len(savers) * (per_module + setting.dropout_mask_bytes * width)
    return (len(savers) if cast else 1) * per_module


def _adapter_dropout(trainable: TrainableCount, setting: ActivationSetting) -> bool:
    return setting.lora_dropout and trainable.rank > 0


def layer_activation_bytes(
    params: ParamCount, trainable: TrainableCount, seq_len: int, micro_batch: int, setting: ActivationSetting
) -> int:
    """Bytes one decoder layer keeps for backward (no checkpointing). See the module docstring for the terms."""
    c, h, heads = setting.compute_bytes, params.hidden_size, params.num_attention_heads
    attention = effective_attention(params, setting.attention)
    by_name = {m.name: m for m in params.linear_modules}
    # Under autocast, full fine-tuning casts the fp32 norm output once per trainable linear, and peft casts every
    # adapter input to fp32 and autocast casts it back: one copy per module. 16-bit inputs of full fine-tuning
    # (attention output, down_proj input) need no cast.
    norm_output_cast = setting.autocast
    adapters_cast = setting.autocast and not trainable.is_full
    per_token = params.norms_per_layer * _norm_bytes(params, trainable, setting) * h

    # Attention: inputs of q/k/v (or fused qkv), what the attention kernel keeps, the o_proj input.
    qkv = [m for m in params.linear_modules if m.role == "attention" and m.name != "o_proj"]
    per_token += _input_group_bytes(qkv, h, trainable, setting, cast=norm_output_cast)
    o_proj = by_name["o_proj"]
    if attention == "eager":
        per_token += 3 * c * params.q_dim  # q and the head-repeated k and v
        per_token += _input_group_bytes([o_proj], params.q_dim, trainable, setting, cast=adapters_cast)
        per_key = heads * (FP32_BYTES + (c if c < FP32_BYTES else 0))  # fp32 softmax output and its 16-bit copy
        if params.model_type == "gemma2":
            per_key += heads * c  # tanh output of the attention-logit soft-capping
        per_token += per_key * seq_len
    else:
        per_token += c * (2 * params.q_dim + 2 * params.kv_dim) + FP32_BYTES * heads  # q, k, v, output, lse
        if "qkv_proj" in by_name:
            # phi3: v is a view of the fused qkv output, which it keeps whole, and the attention output is copied
            # (not shared) into o_proj's input.
            per_token += c * (params.q_dim + params.kv_dim)
            per_token += _input_group_bytes([o_proj], params.q_dim, trainable, setting, cast=adapters_cast)
        elif (adapters_cast or _adapter_dropout(trainable, setting)) and module_saves_input(trainable, o_proj):
            # the adapter's own (cast or dropped-out) copy of the attention output
            per_token += _input_group_bytes([o_proj], params.q_dim, trainable, setting, cast=True)

    # MLP.
    inter, k = params.intermediate_size, params.num_experts_per_tok
    if params.num_experts > 1:
        router = by_name["gate"]
        per_token += _input_group_bytes([router], h, trainable, setting, cast=norm_output_cast)
        per_token += k * (2 * c * h + 4 * c * inter)  # routed input and output copies, gated-MLP tensors
    else:
        gate_up = [m for m in params.linear_modules if m.role == "mlp" and m.name != "down_proj"]
        per_token += _input_group_bytes(gate_up, h, trainable, setting, cast=norm_output_cast)
        per_token += 3 * (FP32_BYTES if setting.fp32_mlp else c) * inter  # gate output, activation output, up output
        down = by_name["down_proj"]
        if trainable.method == "ia3" and setting.autocast and module_saves_input(trainable, down):
            per_token += FP32_BYTES * inter  # the input scaled by an fp32 IA3 vector is promoted to fp32
        else:
            per_token += _input_group_bytes([down], inter, trainable, setting, cast=False)

    # Adapter-internal tensors: LoRA keeps A's r-wide output; IA3 on an output keeps the unscaled output.
    expert_weights = 0
    for module in trainable.targeted:
        visits = k if module.copies > 1 else 1  # an expert module runs k times per token
        if module.copies > 1 and trainable.rank:
            # peft adapts 3-D expert parameters by materialising W + B@A for every expert; the grouped matmul then
            # keeps that merged weight for backward: a full 16-bit copy of the layer's expert weights.
            expert_weights += c * module.weight_params
        if trainable.rank:
            per_token += visits * c * trainable.rank * module.rank_multiplier
        if ia3_scales_output(trainable, module):
            per_token += visits * c * module.out_features
    return per_token * seq_len * micro_batch + expert_weights


def head_activation_bytes(
    params: ParamCount, trainable: TrainableCount, seq_len: int, micro_batch: int, setting: ActivationSetting
) -> int:
    """Final norm and lm_head input (kept when lm_head trains, and always by the chunked loss, which recomputes
    lm_head from it in backward)."""
    per_token = _norm_bytes(params, trainable, setting) * params.hidden_size
    if trainable.is_full or setting.loss_chunk_tokens:
        per_token += setting.compute_bytes * params.hidden_size
    return per_token * seq_len * micro_batch


def model_activation_bytes(
    params: ParamCount,
    trainable: TrainableCount,
    seq_len: int,
    micro_batch: int,
    setting: ActivationSetting,
    gradient_checkpointing: bool,
    offload: bool = False,
) -> int:
    """All decoder layers plus the head, with or without per-layer activation checkpointing (logits excluded).
    `offload` (train.activation_offloading): the checkpointed layers' inputs wait in host memory, so one of them (the
    layer being recomputed) is on the GPU instead of all of them (`layer_input_bytes` each)."""
    layer = layer_activation_bytes(params, trainable, seq_len, micro_batch, setting)
    head = head_activation_bytes(params, trainable, seq_len, micro_batch, setting)
    if not gradient_checkpointing:
        return params.num_layers * layer + head
    kept = 1 if offload else params.num_layers
    return kept * layer_input_bytes(params, trainable, seq_len, micro_batch, setting) + layer + head


def layer_input_bytes(
    params: ParamCount, trainable: TrainableCount, seq_len: int, micro_batch: int, setting: ActivationSetting
) -> int:
    """One checkpointed decoder layer's input (the residual stream): what a checkpointed layer keeps, and what
    activation offloading moves to host memory, per layer and micro batch."""
    return setting.residual_bytes(trainable) * params.hidden_size * seq_len * micro_batch


def logits_bytes(params: ParamCount, seq_len: int, micro_batch: int, setting: ActivationSetting) -> int:
    """Peak at the loss, reached as backward starts (of the whole loss, or of one recomputed chunk): the fp32
    log-softmax output kept for backward, the fp32 gradient nll_loss returns for it and the fp32 gradient log-softmax
    returns. The 16-bit logits and their fp32 upcast are gone by then (trainer/objectives/ returns only the loss)."""
    c = setting.compute_bytes
    per_logit = 3 * FP32_BYTES
    if params.final_logit_softcapping:
        per_logit += c  # tanh output of the soft-capping, kept for backward
    tokens = seq_len * micro_batch
    if setting.loss_chunk_tokens:
        tokens = min(tokens, setting.loss_chunk_tokens)
    return per_logit * tokens * params.vocab_size
