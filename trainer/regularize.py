"""Penalties that keep the trainable weights near where training started: EWC and L2 towards the starting weights.

Against forgetting, beside replay (data.replay), as the field's two standard regularisers:
- EWC (elastic weight consolidation): ewc_lambda/2 x sum_i F_i (w_i - w0_i)^2. F is the diagonal of the empirical
  Fisher information of the starting model on general data (regularize.fisher_path, else data.replay.path): the mean
  over `fisher_samples` records of the squared gradient of each record's mean token log-likelihood. A weight that
  matters to the general data (large F) is held in place; the others are free to learn the task.
- L2 towards the starting weights (L2-SP): l2_lambda/2 x sum_i (w_i - w0_i)^2, every weight alike.

w0 are the trainable weights before step 1: the pre-trained weights in full fine-tuning; with LoRA the adapter's
initialisation (B = 0, so the penalty bounds how far the adapter moves the model; A's Fisher is 0 there, since the
gradient reaches A only through B, so EWC holds B). Weights that gradual unfreezing trains later are anchored too.

Both are computed once, before step 1, and kept in the run dir (`anchor.safetensors`, fp32: two copies of the
trainable weights), so a resumed run penalises the distance from the same point; a run resumed without that file is
refused. Each rank holds every trainable weight whole (single, DDP: checked by the config), adds 1/world of the
penalty to its loss (the data-parallel average of gradients then applies it once), and logs `ewc_penalty` /
`l2_penalty` beside the loss, which stays the language-model loss comparable with eval loss.
"""

from __future__ import annotations

import os
import time

from trainer.errors import ConfigError

FILE = "anchor.safetensors"


class WeightAnchor:
    """The starting weights, their Fisher information, and the penalty of the current weights' distance from them."""

    def __init__(self, params: dict, start: dict, fisher: dict | None, ewc_lambda: float, l2_lambda: float):
        self.params = params  # name -> the model's own Parameter
        self.start = start  # name -> fp32 copy of its value before step 1
        self.fisher = fisher  # name -> fp32 Fisher diagonal (EWC), or None
        self.ewc_lambda = ewc_lambda
        self.l2_lambda = l2_lambda

    def penalty(self):
        """(the total penalty, {term name: its value}) for the current weights, differentiable in them."""
        import torch

        ewc = l2 = torch.zeros((), dtype=torch.float32, device=next(iter(self.start.values())).device)
        for name, param in self.params.items():
            squared = (param.float() - self.start[name]) ** 2
            if self.ewc_lambda:
                ewc = ewc + (self.fisher[name] * squared).sum()
            if self.l2_lambda:
                l2 = l2 + squared.sum()
        terms = {}
        if self.ewc_lambda:
            terms["ewc_penalty"] = 0.5 * self.ewc_lambda * ewc
        if self.l2_lambda:
            terms["l2_penalty"] = 0.5 * self.l2_lambda * l2
        return sum(terms.values()), terms


def anchored_parameters(model, optimizer) -> dict:
    """name -> Parameter for every weight the optimizer may ever update (gradual unfreezing included)."""
    owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
    return {name: p for name, p in model.named_parameters() if id(p) in owned}


def estimate_fisher(model, params: dict, rows: list, strategy, objective, pad_id: int) -> dict:
    """fp32 diagonal empirical Fisher: the mean over `rows` of the squared gradient of each row's mean token loss.

    One forward and backward per row (a per-sample gradient), without dropout. Every rank takes its share of the rows
    and the sums are reduced, so the result is the same on every rank and for any number of ranks."""
    import torch
    import torch.distributed as dist

    from trainer.data.loader import collate

    names = list(params)
    sums = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    was_training = model.training
    frozen = [p for p in params.values() if not p.requires_grad]
    for p in frozen:  # weights that gradual unfreezing trains later get their Fisher now, from the same model
        p.requires_grad_(True)
    model.eval()
    try:
        for row in rows[strategy.rank::strategy.world_size]:
            batch = collate([row], pad_id).to(strategy.device)
            loss = objective.loss_sum(model, batch.inputs, batch.labels, strategy.autocast) / row.num_label_tokens
            # autograd.grad, not backward: nothing accumulates into .grad and no data-parallel hook fires.
            grads = torch.autograd.grad(loss, [params[n] for n in names], allow_unused=True)
            for name, grad in zip(names, grads):
                if grad is not None:
                    sums[name] += grad.float() ** 2
    finally:
        model.train(was_training)
        for p in frozen:
            p.requires_grad_(False)
    for name in names:
        if dist.is_initialized() and strategy.world_size > 1:
            dist.all_reduce(sums[name])
        sums[name] /= max(len(rows), 1)
    return sums


def fisher_source(reg, replay) -> tuple[str | None, str]:
    """(path, format) of the general data the Fisher is estimated on: regularize.fisher_path, else data.replay's."""
    return (reg.fisher_path, reg.fisher_format) if reg.fisher_path else (replay.path, replay.format)


def build_anchor(reg, model, optimizer, strategy, objective, *, fisher_rows: list, fisher_path: str | None,
                 pad_id: int, run_dir: str, log, resumed: bool) -> WeightAnchor | None:
    """The run's anchor (`reg`: the regularize section): computed before step 1 and saved, or loaded on resume;
    None when regularize is off. `model` is the unwrapped model; `fisher_rows` the Fisher's data, tokenised."""
    if not reg.active:
        return None
    params = anchored_parameters(model, optimizer)
    path = os.path.join(run_dir, FILE)
    if resumed:
        return WeightAnchor(params, *_load(path, params, reg.ewc_lambda > 0), reg.ewc_lambda, reg.l2_lambda)
    started = time.perf_counter()
    start = {name: p.detach().float().clone() for name, p in params.items()}
    fisher = None
    lines = []
    if reg.ewc_lambda > 0:
        rows = fisher_rows
        if not rows:
            raise ConfigError("regularize.fisher_path", f"{fisher_path!r} has no usable record to estimate the Fisher "
                              "information on")
        fisher = estimate_fisher(model, params, rows, strategy, objective, pad_id)
        mean = sum(float(f.sum()) for f in fisher.values()) / max(sum(f.numel() for f in fisher.values()), 1)
        lines.append(f"EWC lambda {reg.ewc_lambda:g}, Fisher over {len(rows)} records of {fisher_path} "
                     f"(mean {mean:.3g})")
    if reg.l2_lambda > 0:
        lines.append(f"L2 lambda {reg.l2_lambda:g}")
    if strategy.is_main:
        _save(path, start, fisher)
    strategy.barrier()
    count = sum(p.numel() for p in params.values())
    log(f"regularize: {'; '.join(lines)}; {count:,} weights anchored at their values before step 1 "
        f"({time.perf_counter() - started:.1f} s, {FILE})")
    return WeightAnchor(params, start, fisher, reg.ewc_lambda, reg.l2_lambda)


def _save(path: str, start: dict, fisher: dict | None) -> None:
    from safetensors.torch import save_file

    tensors = {f"start/{name}": t.contiguous().cpu() for name, t in start.items()}
    tensors.update({f"fisher/{name}": t.contiguous().cpu() for name, t in (fisher or {}).items()})
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file(tensors, tmp)
    os.replace(tmp, path)


def _load(path: str, params: dict, needs_fisher: bool) -> tuple[dict, dict | None]:
    from safetensors import safe_open

    if not os.path.exists(path):
        raise ConfigError("regularize", f"{path} is missing: a resumed run penalises the distance from the weights "
                          "its first start anchored (the model has trained since); start a new run.dir")
    device = next(iter(params.values())).device
    with safe_open(path, "pt", device=str(device)) as fh:
        keys = set(fh.keys())
        missing = [name for name in params if f"start/{name}" not in keys
                   or (needs_fisher and f"fisher/{name}" not in keys)]
        if missing:
            raise ConfigError("regularize", f"{path} does not hold the anchor of {missing[0]} (and "
                              f"{len(missing) - 1} more): it belongs to another run; start a new run.dir")
        start = {name: fh.get_tensor(f"start/{name}") for name in params}
        fisher = {name: fh.get_tensor(f"fisher/{name}") for name in params} if needs_fisher else None
    return start, fisher
