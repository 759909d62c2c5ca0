"""Preference tuning (DPO, IPO, SimPO, ORPO; KTO in kto.py) as an objective: the same recipe, strategies,
checkpoints and logs as supervised fine-tuning; only what a micro batch's loss is changes.

A micro batch holds whole pairs (trainer/data/pairs.py): rows [chosen_1..chosen_m, rejected_1..rejected_m], one
forward for both sides. Each side's log-probability is the sum over its answer's tokens, computed with the chunked
cross-entropy (the full logits never exist), per row. The loss of a step is the mean over the global batch's pairs:
`loss_units` (pairs) takes the place of SFT's label-token count in the recipe's normalisation.

The reference model of DPO and IPO is the policy as training starts (the base, or the base with `peft.init_from`'s
adapter): its log-probabilities for every training and validation pair are computed once, in one pass before the
first step, and kept in the run directory (trainer/objectives/reference.py). No second model is held in memory,
under any strategy. SimPO and ORPO need no reference.
"""

from __future__ import annotations

import contextlib

from trainer.objectives.losses import DEFAULT_BETA, REFERENCE_FREE, preference_losses

# Per-step metrics, each a sum over pairs until the recipe divides by the global batch's pair count.
# preference_accuracy: the chosen answer has the higher reward (0 before training for DPO/IPO, whose rewards start at
# 0); logps_accuracy: the model itself gives the chosen answer the higher log-probability (meaningful before training).
PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
                "logps_rejected", "logps_accuracy")


class PreferenceObjective:
    pairs = True

    def __init__(self, cfg, sft, log=print):
        self.method = cfg.name
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA[self.method]
        self.label_smoothing, self.gamma = cfg.label_smoothing, cfg.simpo_gamma
        self.nll_over_sequence = self.method == "orpo" and cfg.orpo_nll == "sequence"
        self.sft = sft  # computes the log-probabilities (chunked) and the evaluation's token loss
        self.needs_reference = self.method not in REFERENCE_FREE
        self.reference = None  # trainer/objectives/reference.py's ReferenceLogps, set by the recipe
        log(f"objective: {self.method} (beta {self.beta:g}"
            + (f", label smoothing {self.label_smoothing:g}" if self.label_smoothing else "")
            + (f", gamma {self.gamma:g}" if self.method == "simpo" else "")
            + (", NLL over the chosen prompts and answers" if self.nll_over_sequence else "")
            + (", reference: the starting policy's log-probs, computed once" if self.needs_reference else
               ", no reference model") + ")")

    def describe(self) -> str:
        return f"{self.method} over pairs; log-probs from {self.sft.describe()}"

    # The evaluation's token loss and perplexity are the chosen answers', as for SFT.
    def loss_sum(self, model, inputs: dict, labels, autocast=contextlib.nullcontext):
        return self.sft.loss_sum(model, inputs, labels, autocast)

    @staticmethod
    def loss_units(rows) -> int:
        return len(rows)

    # data.packing: the micro batch's 2m answers packed into rows of at most this many tokens (0: one per row)
    packing_capacity = 0

    def collate(self, rows, pad_id: int, attention: str = "sdpa"):
        from trainer.data.loader import collate

        samples = [p.chosen for p in rows] + [p.rejected for p in rows]
        if not self.packing_capacity:
            return collate(samples, pad_id, attention)
        return collate_packed(samples, self.packing_capacity, pad_id, attention)

    def sequence_logps(self, model, batch, autocast=contextlib.nullcontext, prompt_labels=None):
        """(log-probability sums [2m], answer token counts [2m]) of the batch's samples; with `prompt_labels`
        (see `chosen_prompt_labels`) also their prompts' log-probability sums [2m], from the same forward."""
        import torch

        if batch.spans is None:
            tokens = (batch.labels[:, 1:] != -100).sum(dim=1)
        else:  # a packed sample's first label is ignored by the collation, as an unpacked row's is by the shift
            tokens = torch.stack([(batch.labels[r, s + 1:e] != -100).sum() for r, s, e in batch.spans])
        if prompt_labels is None:
            return -self.sft.row_loss_sums(model, batch.inputs, batch.labels, autocast, batch.spans), tokens
        answers, prompts = self.sft.row_loss_sums_of(model, batch.inputs, [batch.labels, prompt_labels], autocast,
                                                     batch.spans)
        return -answers, tokens, -prompts

    @staticmethod
    def chosen_prompt_labels(batch, m: int):
        """Labels on the prompt tokens of the batch's first m samples (the chosen answers), -100 elsewhere: what
        TRL's ORPO adds to its NLL term. A sample's first token is predicted by nothing, as in TRL's shift."""
        import torch

        labels = batch.labels
        spans = batch.spans or [(i, 0, labels.size(1)) for i in range(labels.size(0))]
        real = torch.zeros_like(labels, dtype=torch.bool)
        for r, s, e in spans[:m]:
            real[r, s + 1:e] = True
        if batch.spans is None and batch.token_mask is not None:
            real &= batch.token_mask.bool()
        return torch.where(real & (labels == -100), batch.inputs["input_ids"], torch.full_like(labels, -100))

    # The raw sums pair_loss returns, in the order every rank reduces them; `summarise` turns them into metrics.
    stat_names = PAIR_METRICS
    metric_names = PAIR_METRICS

    @staticmethod
    def summarise(sums: dict, units: int) -> dict:
        """Logged metrics from the stats summed over micro batches and ranks: means over the `units` pairs."""
        return {key: sums[key] / max(units, 1) for key in PAIR_METRICS}

    def pair_loss(self, model, batch, reference=None, autocast=contextlib.nullcontext, padding: bool = False):
        """(sum of the pairs' losses, {stat: sum over the pairs}) for a micro batch of m pairs; `reference`: the
        pairs' reference log-probs [m, 2] (chosen, rejected), for DPO/IPO. `padding`: an evaluation's filler batch,
        whose stats are not counted (KTO's batch-wide KL estimate leaves it out)."""
        m = batch.labels.size(0) // 2 if batch.spans is None else len(batch.spans) // 2
        nll = None
        if self.nll_over_sequence:
            prompt_labels = self.chosen_prompt_labels(batch, m)
            logps, tokens, prompt_logps = self.sequence_logps(model, batch, autocast, prompt_labels)
            # TRL's term: one mean over all the micro batch's chosen tokens, given to each of its m pairs
            chosen_tokens = tokens[:m].sum() + (prompt_labels != -100).sum()
            nll = -(logps[:m].sum() + prompt_logps[:m].sum()) / chosen_tokens.clamp(min=1)
        else:
            logps, tokens = self.sequence_logps(model, batch, autocast)
        ref_chosen = ref_rejected = None
        if self.needs_reference:
            reference = reference.to(logps.device, logps.dtype)
            ref_chosen, ref_rejected = reference[:, 0], reference[:, 1]
        losses, chosen_rewards, rejected_rewards = preference_losses(
            self.method, logps[:m], logps[m:], tokens[:m], tokens[m:], ref_chosen, ref_rejected, beta=self.beta,
            label_smoothing=self.label_smoothing, gamma=self.gamma, nll=nll)
        detached = logps.detach()
        stats = {"rewards_chosen": chosen_rewards.sum(), "rewards_rejected": rejected_rewards.sum(),
                 "reward_margin": (chosen_rewards - rejected_rewards).sum(),
                 "preference_accuracy": (chosen_rewards > rejected_rewards).float().sum(),
                 "logps_chosen": detached[:m].sum(), "logps_rejected": detached[m:].sum(),
                 "logps_accuracy": (detached[:m] > detached[m:]).float().sum()}
        return losses.sum(), stats


def collate_packed(samples: list, capacity: int, pad_id: int, attention: str):
    """`samples` packed best-fit into rows of at most `capacity` tokens (the answers of one pair may share a row:
    attention and positions stay within each sample), with each sample's (row, start, end) in `samples`' order."""
    from trainer.data.loader import collate
    from trainer.data.packing import PackedRow, best_fit_decreasing

    bins = best_fit_decreasing([len(s.input_ids) for s in samples], capacity)
    spans: list = [None] * len(samples)
    # With flash attention, packed rows become one flattened row (offsets run on across rows); rows of one sample
    # each are collated padded either way.
    flattened = attention == "flash_attention_2" and any(len(members) > 1 for members in bins)
    offset = 0
    for row, members in enumerate(bins):
        start = offset if flattened else 0
        for index in members:
            end = start + len(samples[index].input_ids)
            spans[index] = (0 if flattened else row, start, end)
            start = end
        offset = start if flattened else 0
    batch = collate([PackedRow(tuple(samples[i] for i in members)) for members in bins], pad_id, attention)
    batch.spans = spans
    return batch
