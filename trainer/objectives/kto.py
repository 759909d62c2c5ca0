"""KTO (Kahneman-Tversky optimisation) as an objective: preference tuning on single answers labelled desirable or
not, so data without pairs (thumbs up/down logs, KTO files with `label`) can be used; pairs count as one desirable
and one undesirable answer.

Each item of a micro batch is an answer and, beside it, the same prompt with another record's answer
(trainer/data/pairs.py draws the mismatch once): rows [answer_1..answer_m, mismatched_1..mismatched_m], one forward.
The mismatched rows estimate the KL term, KTO's reference point: the mean over the micro batch (and over ranks, as
TRL gathers it) of policy minus reference log-probs, clamped at 0 and without gradient. The reference log-probs of
both rows come from the pass before step 1, as for DPO (trainer/objectives/reference.py): no second model.
"""

from __future__ import annotations

import contextlib

from trainer.objectives.losses import DEFAULT_BETA, kto_losses
from trainer.objectives.preference import PreferenceObjective

# Raw sums per micro batch; `summarise` divides each by the answers it is a mean over.
KTO_STATS = ("rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected", "num_desirable",
             "num_undesirable", "preference_accuracy", "kl")
# rewards_/logps_chosen: over the desirable answers, _rejected: over the undesirable ones (TRL's names and means);
# preference_accuracy: answers whose reward has their label's sign (desirable above 0, undesirable below);
# kl: the KL estimate the losses used, averaged over the answers.
KTO_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
               "logps_rejected", "kl")


class KTOObjective(PreferenceObjective):
    stat_names = KTO_STATS
    metric_names = KTO_METRICS

    def __init__(self, cfg, sft, log=print):
        self.method = "kto"
        self.beta = cfg.beta if cfg.beta is not None else DEFAULT_BETA["kto"]
        self.desirable_weight, self.undesirable_weight = cfg.desirable_weight, cfg.undesirable_weight
        self.sft = sft
        self.needs_reference = True
        self.reference = None
        weights = ("" if (self.desirable_weight, self.undesirable_weight) == (1.0, 1.0) else
                   f", weights desirable {self.desirable_weight:g} / undesirable {self.undesirable_weight:g}")
        log(f"objective: kto (beta {self.beta:g}{weights}, reference: the starting policy's log-probs, computed "
            "once; KL estimate from each answer's prompt with another record's answer)")

    def describe(self) -> str:
        return f"kto over labelled answers; log-probs from {self.sft.describe()}"

    def collate(self, rows, pad_id: int, attention: str = "sdpa"):
        import torch

        batch = super().collate(rows, pad_id, attention)
        batch.desirable = torch.tensor([bool(p.desirable) for p in rows], dtype=torch.bool)
        return batch

    @staticmethod
    def summarise(sums: dict, units: int) -> dict:
        desirable, undesirable = sums["num_desirable"], sums["num_undesirable"]
        metrics = {"rewards_chosen": sums["rewards_chosen"] / max(desirable, 1),
                   "rewards_rejected": sums["rewards_rejected"] / max(undesirable, 1),
                   "logps_chosen": sums["logps_chosen"] / max(desirable, 1),
                   "logps_rejected": sums["logps_rejected"] / max(undesirable, 1),
                   "preference_accuracy": sums["preference_accuracy"] / max(units, 1),
                   "kl": sums["kl"] / max(units, 1)}
        metrics["reward_margin"] = metrics["rewards_chosen"] - metrics["rewards_rejected"]
        return {key: metrics[key] for key in KTO_METRICS}

    def kl_estimate(self, mismatched, reference, padding: bool):
        """KTO's reference point: the mean over this micro batch's mismatched rows (on every rank: summed with a
        count across ranks) of policy minus reference log-probs, at least 0, no gradient."""
        import torch
        import torch.distributed as dist

        weight = 0.0 if padding else 1.0
        totals = torch.stack([(mismatched.detach() - reference).sum() * weight,
                              torch.tensor(float(mismatched.numel()) * weight, device=mismatched.device,
                                           dtype=mismatched.dtype)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        return (totals[0] / totals[1].clamp(min=1)).clamp(min=0)

    def pair_loss(self, model, batch, reference=None, autocast=contextlib.nullcontext, padding: bool = False):
        """(sum of the answers' losses, {stat: sum}) for a micro batch of m answers; `reference` [m, 2]: the
        reference log-probs of each answer and of its mismatched row."""
        logps, _ = self.sequence_logps(model, batch, autocast)
        m = logps.size(0) // 2
        reference = reference.to(logps.device, logps.dtype)
        kl = self.kl_estimate(logps[m:], reference[:, 1], padding)
        desirable = batch.desirable.to(logps.device)
        losses, rewards = kto_losses(logps[:m], reference[:, 0], desirable, kl, self.beta, self.desirable_weight,
                                     self.undesirable_weight)
        answers = logps[:m].detach()
        stats = {"rewards_chosen": rewards[desirable].sum(), "rewards_rejected": rewards[~desirable].sum(),
                 "logps_chosen": answers[desirable].sum(), "logps_rejected": answers[~desirable].sum(),
                 "num_desirable": desirable.sum(), "num_undesirable": (~desirable).sum(),
                 "preference_accuracy": ((rewards > 0) == desirable).logical_and(rewards != 0).float().sum(),
                 "kl": kl * m}
        return losses.sum(), stats

