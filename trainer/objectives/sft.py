"""Supervised fine-tuning: the sum of next-token cross-entropy over a micro batch's label tokens.

The model body runs as the strategy wrapped it (DDP, FSDP2 and DeepSpeed see their own forward), with transformers'
`logits_to_keep` set to no position, so lm_head projects nothing there; the final hidden states are taken from the
decoder's output and the loss is computed from them in chunks (chunked_ce.py), or, on CUDA with Liger installed and a
plain lm_head, by Liger's fused linear cross-entropy. Models where that is not the same computation as their own
forward fall back to the unchunked loss, with the reason logged once.
"""

from __future__ import annotations

import contextlib
import inspect

from trainer.objectives import CHUNKABLE_MODEL_TYPES
from trainer.objectives.chunked_ce import chunked_cross_entropy_sum, labelled_positions, token_loss_sum


class SFTObjective:
    pairs = False

    def __init__(self, model, chunk_tokens: int, fused_kernel: str = "auto", log=print):
        """`model`: the unwrapped model (PEFT or transformers), to find its decoder and lm_head once."""
        self.chunk_tokens = chunk_tokens
        self.base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.unchunked_reason = self._unchunked_reason(model)
        self.softcap = getattr(self.base.config, "final_logit_softcapping", None)
        self.fused = None if self.unchunked_reason else _liger_loss(self.base, fused_kernel, self.softcap)
        log(f"loss: {self.describe()}")

    @staticmethod
    def loss_units(rows) -> int:
        """What a step's loss sum is divided by: the label tokens of the whole global batch."""
        return sum(row.num_label_tokens for row in rows)

    def describe(self) -> str:
        if self.unchunked_reason:
            return f"unchunked cross-entropy ({self.unchunked_reason})"
        if self.fused is not None:
            return "Liger fused linear cross-entropy"
        return f"cross-entropy over chunks of {self.chunk_tokens} tokens (the full logits are never materialised)"

    def _unchunked_reason(self, model) -> str | None:
        if self.chunk_tokens == 0:
            return "objective.chunk_tokens=0"
        config = getattr(model, "active_peft_config", None)
        if config is not None and getattr(config, "is_prompt_learning", False):
            return "prompt/prefix tuning adds virtual tokens in PEFT's own forward"
        model_type = getattr(self.base.config, "model_type", None)
        if model_type not in CHUNKABLE_MODEL_TYPES:
            return f"model_type {model_type!r} may do more than lm_head after its decoder"
        if "logits_to_keep" not in inspect.signature(self.base.forward).parameters:
            return f"{type(self.base).__name__}.forward has no logits_to_keep"
        head = self.base.get_output_embeddings()
        if head is not None and hasattr(getattr(head, "weight", None), "ds_id"):
            # ZeRO-3 releases lm_head's gathered weight after the forward; the chunks' recomputation in backward
            # would then see an empty shard (torch.utils.checkpoint: "different metadata").
            return "DeepSpeed ZeRO-3 partitions lm_head between the forward and its recomputation"
        return None

    def loss_sum(self, model, inputs: dict, labels, autocast=contextlib.nullcontext):
        """Sum of next-token cross-entropy over `labels` != -100, fp32. `model` is what the strategy returned (it
        runs the forward); `autocast` is the strategy's context, which lm_head runs under as in the model's forward."""
        if self.unchunked_reason:
            with autocast():
                logits = model(**inputs).logits
            return token_loss_sum(logits, labels)
        with autocast():
            hidden = self.final_hidden_states(model, inputs)
            if self.fused is not None:
                weight = self.base.get_output_embeddings().weight
                return self.fused(weight.to(hidden.dtype), *labelled_positions(hidden, labels)).float()
            return chunked_cross_entropy_sum(hidden, labels, self.base.get_output_embeddings(), self.chunk_tokens,
                                             self.softcap)

    def row_loss_sums(self, model, inputs: dict, labels, autocast=contextlib.nullcontext, spans=None):
        """Per row of the batch, the sum of next-token cross-entropy over its label tokens (fp32, [b]): minus the
        log-probability of the row's answer, for the preference objectives. Chunked as `loss_sum` is. `spans`: per
        sample of packed rows, (row, start, end); a sample's tokens predict only each other (the packed collation
        keeps attention and positions apart), so its sum is taken over its own span."""
        return self.row_loss_sums_of(model, inputs, [labels], autocast, spans)[0]

    def row_loss_sums_of(self, model, inputs: dict, label_sets: list, autocast=contextlib.nullcontext, spans=None):
        """`row_loss_sums` for several label tensors over one forward: a list of per-sample sums, one per set."""
        import torch

        if spans is None:
            spans = [(i, 0, label_sets[0].size(1)) for i in range(label_sets[0].size(0))]
        if self.unchunked_reason:
            with autocast():
                logits = model(**inputs).logits
            return [torch.stack([token_loss_sum(logits[r:r + 1, s:e], labels[r:r + 1, s:e]) for r, s, e in spans])
                    for labels in label_sets]
        with autocast():
            hidden = self.final_hidden_states(model, inputs)
            head = self.base.get_output_embeddings()
            results = []
            for labels in label_sets:
                sums = []
                for r, s, e in spans:
                    if self.fused is not None:
                        sums.append(self.fused(head.weight.to(hidden.dtype),
                                               *labelled_positions(hidden[r:r + 1, s:e], labels[r:r + 1, s:e])).float())
                    else:
                        sums.append(chunked_cross_entropy_sum(hidden[r:r + 1, s:e], labels[r:r + 1, s:e], head,
                                                              self.chunk_tokens, self.softcap))
                results.append(torch.stack(sums))
            return results

    def final_hidden_states(self, model, inputs: dict):
        """The decoder's output (after the final norm) from a forward of the whole model with no logits kept."""
        import torch

        captured = []
        decoder = self.base.get_decoder()
        handle = decoder.register_forward_hook(lambda module, args, output: captured.append(output[0]))
        try:
            no_position = torch.empty(0, dtype=torch.long, device=inputs["input_ids"].device)
            model(**inputs, logits_to_keep=no_position)
        finally:
            handle.remove()
        return captured[-1]


def _liger_loss(base, fused_kernel: str, softcap):
    """Liger's fused linear cross-entropy, where it computes what lm_head does: on CUDA, with liger_kernel
    installed, and a plain nn.Linear lm_head whose whole weight this rank holds (not a PEFT-adapted head, not a
    ZeRO-3 partition, which only the module's own hooks gather). None otherwise."""
    if fused_kernel == "none":
        return None
    import torch

    head = base.get_output_embeddings()
    weight = getattr(head, "weight", None)
    if not torch.cuda.is_available() or type(head) is not torch.nn.Linear or head.bias is not None:
        return None
    if weight is None or weight.device.type != "cuda" or hasattr(weight, "ds_id") or type(weight) is not \
            torch.nn.Parameter:
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(ignore_index=-100, reduction="sum", softcap=softcap)
