"""Batches for training: a resumable sampler whose global batch does not depend on the world size.

Every optimizer step consumes one global batch of rows, drawn from a seeded per-epoch permutation.
Each rank takes its own micro batches out of that global batch, so 1, 2 or 8 ranks see the same data
at every step, and a checkpoint's (epoch, position) resumes exactly on any world size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.encode import IGNORE_INDEX, EncodedSample


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # rows of this epoch already consumed


class GlobalBatchSampler:
    def __init__(self, num_rows: int, global_batch_size: int, seed: int, shuffle: bool = True):
        if num_rows < global_batch_size:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch_size}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.state = SamplerState()
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size  # the incomplete tail is dropped, reshuffled next epoch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> list[int]:
        if self.state.position + self.global_batch_size > self.num_rows:
            self.state = SamplerState(self.state.epoch + 1, 0)
        order = self._epoch_order(self.state.epoch)
        start = self.state.position
        self.state.position += self.global_batch_size
        return [int(i) for i in order[start:start + self.global_batch_size]]

    def state_dict(self) -> dict:
        return {"epoch": self.state.epoch, "position": self.state.position, "num_rows": self.num_rows,
                "global_batch_size": self.global_batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["global_batch_size"] != self.global_batch_size:
            raise ValueError(f"the checkpoint's data ({state['num_rows']} rows, global batch "
                             f"{state['global_batch_size']}) differs from this run's ({self.num_rows} rows, "
                             f"global batch {self.global_batch_size}): resume with the same data and batch size")
        self.state = SamplerState(int(state["epoch"]), int(state["position"]))


def local_microbatches(global_indices: list[int], rank: int, world_size: int, micro_batch_size: int) -> list[list[int]]:
    """This rank's micro batches: rank r takes rows [(j*W + r)*m, (j*W + r + 1)*m) for micro step j."""
    per_step = world_size * micro_batch_size
    if len(global_indices) % per_step:
        raise ValueError(f"global batch {len(global_indices)} is not a multiple of world_size x micro_batch_size")
    steps = len(global_indices) // per_step
    return [global_indices[(j * world_size + rank) * micro_batch_size:(j * world_size + rank + 1) * micro_batch_size]
            for j in range(steps)]


@dataclass
class Batch:
    """What one forward/backward needs: the model's keyword inputs, the labels, and the real token count."""

    inputs: dict  # passed as model(**inputs): input_ids, attention_mask (and position_ids when packed)
    labels: object  # torch.LongTensor, IGNORE_INDEX where no loss is taken
    num_tokens: int  # non-padding tokens, for throughput

    def to(self, device) -> "Batch":
        return Batch({k: v.to(device) for k, v in self.inputs.items()}, self.labels.to(device), self.num_tokens)


def collate(rows: list[EncodedSample], pad_id: int) -> Batch:
    """Right-pad to the longest row; pads are masked out of attention and the loss."""
    import torch

    length = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        attention_mask[i, :n] = 1
    return Batch({"input_ids": input_ids, "attention_mask": attention_mask}, labels,
                 sum(len(row.input_ids) for row in rows))
