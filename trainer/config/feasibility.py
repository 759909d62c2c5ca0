"""Which strategy x PEFT method x optimizer combinations the engines can train: one rule for `trainer train`'s
validation (trainer/config/validate.py), the planner behind `trainer plan` and `strategy=auto` (trainer/plan), so
that whatever plan or auto recommends, train accepts (tests/unit/test_plan_train_agree.py walks a grid of them).

Strategies are named as the planner names them: `fsdp_offload` is strategy=fsdp with strategy.cpu_offload=true,
`zero3_offload` is ZeRO-3 with parameters and optimizer offloaded (conf/strategy/zero3_offload.yaml). Pure Python:
the planner imports it without torch.
"""

from __future__ import annotations

BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "paged_adamw")
FSDP_STRATEGIES = ("fsdp", "fsdp_offload")
DEEPSPEED_STRATEGIES = ("zero1", "zero2", "zero3", "zero3_offload")


def refusal(strategy: str, method: str, optimizer: str, param_offload: bool | None = None) -> tuple[str, str] | None:
    """(config key, why) when STRATEGY cannot train METHOD (peft.name) with OPTIMIZER (optim.name, or the planner's
    name for it); None when it can. PARAM_OFFLOAD: whether DeepSpeed offloads parameters (defaults to
    zero3_offload's)."""
    deepspeed = strategy in DEEPSPEED_STRATEGIES
    param_offload = strategy == "zero3_offload" if param_offload is None else param_offload
    if method == "qlora" and deepspeed and param_offload:
        return "strategy.offload_param", (
            "QLoRA with DeepSpeed parameter offload is not supported: DeepSpeed moves parameters between GPU and host, "
            "but a 4-bit weight's quantisation state (block scales, code book) is not a parameter and would stay "
            "behind; use strategy=fsdp strategy.cpu_offload=true (FSDP2 offloads the 4-bit shards and keeps that "
            "state on the GPU), or turn parameter offload off (optimizer offload may stay)")
    if optimizer in BITSANDBYTES_OPTIMIZERS and strategy in FSDP_STRATEGIES:
        return "optim.name", (
            f"{optimizer} (bitsandbytes) cannot step FSDP2's sharded DTensor parameters (its kernels get mixed Tensor "
            "and DTensor arguments): use optim=adamw with fsdp, or a DeepSpeed strategy (zero1/zero2/zero3) for "
            "8-bit or paged optimizers")
    return None


# Strategies that shard parameters: FSDP2 and ZeRO-3 swap a layer's parameters in and out around its forward, while
# PEFT's LoRA on fused expert weights re-parametrises the expert weight itself during that forward.
EXPERT_LORA_REFUSED = ("fsdp", "fsdp_offload", "zero3", "zero3_offload")


def experts_refusal(strategy: str) -> tuple[str, str] | None:
    """(config key, why) when STRATEGY cannot train LoRA on fused MoE expert weights (peft.experts=true)."""
    if strategy in EXPERT_LORA_REFUSED:
        return "peft.experts", (
            f"LoRA on fused expert weights is not supported with strategy={strategy}: it re-parametrises each "
            "expert weight during the forward, where FSDP2/ZeRO-3 swap the sharded weights in and out; use single, "
            "ddp, zero1 or zero2, or peft.experts=false")
    return None


# Strategies whose ranks each hold the whole model, so a rank can keep its input embedding on its own host.
HOST_EMBEDDING_STRATEGIES = ("single", "ddp", "zero1", "zero2")
# PEFT methods that leave the input embedding frozen and untouched (prompt and prefix tuning read it to build their
# virtual tokens on the device; full fine-tuning trains it).
HOST_EMBEDDING_METHODS = ("lora", "dora", "qlora", "ia3")


def host_embedding_refusal(strategy: str, method: str, tied_embeddings: bool) -> tuple[str, str] | None:
    """(config key, why) when train.embedding_on_host cannot apply to STRATEGY x METHOD on a model whose lm_head is
    (TIED_EMBEDDINGS) or is not its input embedding. STRATEGY auto: the method and model only (auto then chooses
    among the strategies that keep it, the planner refusing the others)."""
    why = None
    if method not in HOST_EMBEDDING_METHODS:
        why = (f"peft={method} {'trains the embedding' if method in ('none', 'full') else 'builds its virtual tokens'}"
               " on the GPU; it needs one of " + ", ".join(HOST_EMBEDDING_METHODS))
    elif tied_embeddings:
        why = "this model's lm_head is its input embedding (tie_word_embeddings), which the loss needs on the GPU"
    elif strategy != "auto" and strategy not in HOST_EMBEDDING_STRATEGIES:  # auto picks among those that keep it
        why = (f"strategy={strategy} shards the embedding across ranks, which already divides it; use "
               + ", ".join(HOST_EMBEDDING_STRATEGIES))
    return ("train.embedding_on_host", f"{why}: set train.embedding_on_host=false") if why else None
