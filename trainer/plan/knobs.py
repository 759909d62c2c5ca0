"""What to turn before adding GPUs: for a run that does not fit, the figure each cheap knob gives on the same GPUs
(activation checkpointing, activation offloading, the chunked loss, a smaller micro batch, an 8-bit optimizer, a
shorter sequence), then
all of the free ones together. `trainer plan` prints them under a configured run that does not fit."""

from __future__ import annotations

from dataclasses import dataclass

from trainer.config.feasibility import refusal
from trainer.objectives import DEFAULT_CHUNK_TOKENS
from trainer.plan.memory import PlanInputs, estimate_memory


@dataclass(frozen=True)
class Knob:
    overrides: tuple[str, ...]  # the config overrides, as a user types them
    total: int  # bytes per GPU with them
    fits: bool
    changes_the_job: bool  # a shorter sequence truncates the data; the others train the same model


def cheap_knobs(inputs: PlanInputs, gpu_memory_gib: float, host_memory_gib: float | None = None,
                rows_per_example: int = 1) -> list[Knob]:
    """The knobs that lower INPUTS' memory, each alone and (the ones that keep the job) together, in the order a
    user would try them. ROWS_PER_EXAMPLE: rows per micro-batch example (2 for preference pairs), so that the micro
    batch is named in the config's units."""
    variants: list[tuple[tuple[str, ...], dict, bool]] = []
    if not inputs.gradient_checkpointing:
        variants.append((("train.gradient_checkpointing=true",), {"gradient_checkpointing": True}, False))
    if not inputs.activation_offloading:
        variants.append((("train.gradient_checkpointing=true", "train.activation_offloading=true")
                         if not inputs.gradient_checkpointing else ("train.activation_offloading=true",),
                         {"gradient_checkpointing": True, "activation_offloading": True}, False))
    if not inputs.embedding_on_host:  # refused (no figure) where the embedding trains, is tied or is sharded
        variants.append((("train.embedding_on_host=true",), {"embedding_on_host": True}, False))
    if not inputs.loss_chunk_tokens:
        variants.append(((f"objective.chunk_tokens={DEFAULT_CHUNK_TOKENS}",),
                         {"loss_chunk_tokens": DEFAULT_CHUNK_TOKENS}, False))
    micro = inputs.micro_batch_size // rows_per_example
    while micro > 1:
        micro //= 2
        variants.append(((f"train.micro_batch_size={micro}",), {"micro_batch_size": micro * rows_per_example}, False))
    if inputs.optimizer == "adamw" and not refusal(inputs.strategy, inputs.peft_method, "adamw_8bit") \
            and inputs.strategy != "zero3_offload":
        # DeepSpeed takes a bitsandbytes optimizer only when told to (trainer/config/validate.py says so too)
        untested = ("+strategy.deepspeed_overrides.zero_allow_untested_optimizer=true",) \
            if inputs.strategy.startswith("zero") else ()
        variants.append((("optim=adamw_8bit", *untested), {"optimizer": "adamw_8bit"}, False))
    seq = inputs.seq_len
    for _ in range(2):
        seq //= 2
        if seq >= 256:
            variants.append(((f"data.max_seq_len={seq}",), {"seq_len": seq}, True))
    knobs = [_knob(inputs, overrides, changes, job, gpu_memory_gib, host_memory_gib)
             for overrides, changes, job in variants]
    # All the knobs that keep the job at once (the micro batch at its smallest, 1).
    together = {}
    for overrides, changes, changes_the_job in variants:
        if not changes_the_job and not (overrides[0].startswith("train.micro_batch_size=")
                                        and changes["micro_batch_size"] != rows_per_example):
            together[overrides] = changes
    if len(together) > 1:
        merged = {key: value for changes in together.values() for key, value in changes.items()}
        overrides = tuple(dict.fromkeys(o for group in together for o in group))  # each once, in order
        knobs.append(_knob(inputs, overrides, merged, False, gpu_memory_gib, host_memory_gib))
    return [knob for knob in knobs if knob is not None]


def _knob(inputs: PlanInputs, overrides, changes: dict, changes_the_job: bool, gpu_memory_gib: float,
          host_memory_gib: float | None) -> Knob | None:
    try:
        estimate = estimate_memory(inputs.replace(**changes))
    except ValueError:
        return None
    return Knob(tuple(overrides), estimate.total, estimate.fits(gpu_memory_gib, host_memory_gib), changes_the_job)
