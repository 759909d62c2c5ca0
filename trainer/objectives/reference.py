"""The reference log-probabilities of DPO and IPO, computed once and kept in the run directory.

The reference policy is the model as training starts. Instead of a second copy of it in memory (a second sharded
model under FSDP/ZeRO-3, a disabled-adapter forward per step under PEFT), one no-grad pass over every training and
validation pair, before step 1, records each side's log-probability: 2 numbers per pair, whatever the model.
The pass costs about a third of one epoch's training compute. Every rank computes its share of the pairs (all ranks
run the same number of forwards, so sharded strategies stay in lockstep) and the shares are summed.

`reference_logps.safetensors` in the run dir holds them with the data fingerprint they belong to; a resumed run
loads them (the model has moved on since, so they cannot be recomputed) and refuses a file that does not belong to
its data.
"""

from __future__ import annotations

import os

from trainer.errors import ConfigError

FILE = "reference_logps.safetensors"


def _share(count: int, rank: int, world: int, batch: int) -> list[list[int]]:
    """This rank's index batches; every rank gets the same number (a short one is padded with index 0)."""
    import math

    mine = list(range(rank, count, world))
    batches = math.ceil(math.ceil(count / world) / batch)
    return [(mine[i * batch:(i + 1) * batch] or [0]) for i in range(batches)]


def compute_reference_logps(objective, model, pairs, strategy, batch_size: int, pad_id: int, attention: str):
    """float64 [len(pairs), 2]: (chosen, rejected) log-probability sums under the current model, no dropout."""
    import torch
    import torch.distributed as dist

    out = torch.zeros((len(pairs), 2), dtype=torch.float64, device=strategy.device)
    if not pairs:
        return out.cpu()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for indices in _share(len(pairs), strategy.rank, strategy.world_size, batch_size):
                rows = [pairs[i] for i in indices]
                batch = objective.collate(rows, pad_id, attention).to(strategy.device)
                logps, _ = objective.sequence_logps(model, batch, strategy.autocast)
                m = len(rows)
                values = torch.stack([logps[:m], logps[m:]], dim=1).double()
                for row, index in enumerate(indices):
                    out[index] = values[row]  # a padding batch writes index 0 again: the same value
    finally:
        model.train(was_training)
    if dist.is_initialized() and strategy.world_size > 1:
        # Each index was written by exactly one rank (index 0 may be rewritten by a padding batch: keep rank 0's).
        owned = torch.zeros(len(pairs), dtype=torch.float64, device=strategy.device)
        owned[strategy.rank::strategy.world_size] = 1
        out *= owned[:, None]
        dist.all_reduce(out)
    return out.cpu()


def save_reference(run_dir: str, logps: dict, fingerprint: str) -> None:
    from safetensors.torch import save_file

    path = os.path.join(run_dir, FILE)
    tmp = f"{path}.tmp.{os.getpid()}"
    save_file({k: v.contiguous() for k, v in logps.items()}, tmp, metadata={"data_fingerprint": fingerprint})
    os.replace(tmp, path)


def load_reference(run_dir: str, fingerprint: str) -> dict:
    from safetensors import safe_open

    path = os.path.join(run_dir, FILE)
    if not os.path.exists(path):
        raise ConfigError("resume", f"{path} is missing: a resumed DPO/IPO run needs the reference log-probs its "
                          "first start computed (the model has trained since); start a new run.dir")
    with safe_open(path, "pt") as fh:
        found = (fh.metadata() or {}).get("data_fingerprint")
        if found != fingerprint:
            raise ConfigError("data", f"{path} was computed for other training data (fingerprint {found}, this run "
                              f"{fingerprint}); resume with the data the run started with, or start a new run.dir")
        return {key: fh.get_tensor(key) for key in fh.keys()}
