"""The preference losses, one function per method, on per-pair sequence log-probabilities (fp32 tensors [m]).

Each returns (per-pair losses, chosen rewards, rejected rewards); rewards are what the methods' papers (and TRL's
logs) call the implicit reward: beta x the log-ratio to the reference for DPO/IPO, beta x the mean token log-prob
for the reference-free SimPO/ORPO. `chosen`/`rejected` are sums of log-probabilities over each answer's tokens,
`chosen_tokens`/`rejected_tokens` the answers' token counts, `ref_*` the reference model's sums.

    dpo    -log sigmoid(beta * ((c - ref_c) - (r - ref_r))), label smoothing as conservative DPO
    ipo    ((c - ref_c)/n_c - (r - ref_r)/n_r - 1/(2 beta))^2   (per-token log-ratios, as TRL and the IPO authors)
    simpo  -log sigmoid(beta * (c/n_c - r/n_r) - gamma)        (no reference)
    orpo   -c/n_c - beta * log sigmoid(log odds(c/n_c) - log odds(r/n_r))   (NLL of the chosen answer + odds ratio;
           `nll` replaces -c/n_c: TRL's NLL over the chosen prompts and answers, objective.orpo_nll=sequence)
    kto    per answer y, z = (y - ref_y) the log-ratio, kl the batch's KL estimate (>= 0, no gradient):
           desirable  w_d * (1 - sigmoid(beta * (z - kl))),  undesirable  w_u * (1 - sigmoid(beta * (kl - z)))
"""

from __future__ import annotations

PREFERENCE_METHODS = ("dpo", "ipo", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0, "orpo": 0.1, "kto": 0.1}


def _smoothed_sigmoid_loss(logits, label_smoothing: float):
    import torch.nn.functional as F

    return -F.logsigmoid(logits) * (1 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def log1mexp(x):
    """log(1 - exp(x)) for x < 0, accurate at both ends (expm1 near 0, log1p far from it)."""
    import torch

    return torch.where(x > -0.6931471805599453, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def preference_losses(method: str, chosen, rejected, chosen_tokens, rejected_tokens, ref_chosen=None,
                      ref_rejected=None, beta: float = 0.1, label_smoothing: float = 0.0, gamma: float = 1.0,
                      nll=None):
    import torch.nn.functional as F

    if method in ("dpo", "ipo"):
        chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
        if method == "dpo":
            losses = _smoothed_sigmoid_loss(beta * (chosen_ratio - rejected_ratio), label_smoothing)
        else:
            delta = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
            losses = (delta - 1 / (2 * beta)) ** 2
        return losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    chosen_mean = chosen / chosen_tokens.clamp(min=1)
    rejected_mean = rejected / rejected_tokens.clamp(min=1)
    if method == "simpo":
        losses = _smoothed_sigmoid_loss(beta * (chosen_mean - rejected_mean) - gamma, label_smoothing)
    elif method == "orpo":
        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        losses = (-chosen_mean if nll is None else nll) - beta * F.logsigmoid(log_odds)
    else:
        raise ValueError(f"unknown preference method {method!r}; expected one of {PREFERENCE_METHODS}")
    return losses, beta * chosen_mean.detach(), beta * rejected_mean.detach()


def kto_losses(logps, ref_logps, desirable, kl, beta: float = 0.1, desirable_weight: float = 1.0,
               undesirable_weight: float = 1.0):
    """(per-answer losses, rewards) for answers labelled `desirable` (bool [m]); `kl` the detached KL estimate."""
    import torch

    ratios = logps - ref_logps
    losses = torch.where(desirable, desirable_weight * (1 - torch.sigmoid(beta * (ratios - kl))),
                         undesirable_weight * (1 - torch.sigmoid(beta * (kl - ratios))))
    return losses, beta * ratios.detach()
