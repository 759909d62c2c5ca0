"""Objectives: what a training step optimises, computed from a micro batch. The recipe calls one, as it calls its
strategy; it never branches on which.

    sft   next-token cross-entropy over label tokens, chunked over tokens so the full logits never exist (sft.py)
    dpo, ipo, simpo, orpo   preference tuning on chosen/rejected pairs (preference.py, losses.py, reference.py)
    kto   preference tuning on answers labelled desirable or not, paired or not (kto.py, losses.py, reference.py)

Importing this package does not import torch (the planner reads DEFAULT_CHUNK_TOKENS).
"""

from __future__ import annotations

# Tokens per lm_head + cross-entropy chunk. 256 x a 128k vocabulary is 0.37 GiB at the backward peak (12 bytes per
# logit), against 5.9 GiB for 4096 unchunked tokens; each chunk is still a large matmul (256 x h x V).
DEFAULT_CHUNK_TOKENS = 256
OBJECTIVES = ("sft", "dpo", "ipo", "simpo", "orpo", "kto")  # all but sft: trainer/objectives/losses.py
# Families whose causal-LM forward is `lm_head(final hidden states)`, plus Gemma 2's final logit soft-capping, which
# the chunks apply themselves. Others (logit scaling in Cohere/Granite, remote code) keep their own forward and the
# unchunked loss; the planner (trainer/plan/) counts them that way too.
CHUNKABLE_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
                         "phi3")
FUSED_KERNELS = ("auto", "none")


def build_objective(cfg, model, log=print):
    """The configured objective for `model` (unwrapped: the PEFT or transformers model the strategy wraps)."""
    from trainer.objectives.sft import SFTObjective

    sft = SFTObjective(model, cfg.chunk_tokens, cfg.fused_kernel, log=log)
    mode = pair_mode(cfg)
    if not mode:
        return sft
    if mode == UNPAIRED:
        from trainer.objectives.kto import KTOObjective

        return KTOObjective(cfg, sft, log=log)
    from trainer.objectives.preference import PreferenceObjective

    return PreferenceObjective(cfg, sft, log=log)


PAIRED, UNPAIRED = "paired", "unpaired"


def pair_mode(cfg) -> str:
    """What the data pipeline builds for the objective: "" (SFT samples), PAIRED (chosen/rejected pairs: dpo, ipo,
    simpo, orpo) or UNPAIRED (KTO: answers labelled desirable or not, each beside a mismatched answer)."""
    return "" if cfg.name == "sft" else UNPAIRED if cfg.name == "kto" else PAIRED
