"""Packing: several samples per row of `max_seq_len` tokens, placed best-fit decreasing.

Samples are placed longest first, each into the open row whose free space fits it most tightly (a new row
when none fits). Rows are fixed once per run (from the same tokens on every rank, so packing never depends
on the world size); the sampler shuffles rows, not samples. Inside a row, attention stops at sample
boundaries and position ids restart at 0 per sample (see `loader.collate`), so a packed sample is computed
exactly as it would be alone.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from dataclasses import dataclass
from typing import Sequence

from trainer.data.encode import IGNORE_INDEX, EncodedSample, TokenTable


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bins of indices into `lengths`, each summing to at most `capacity`.

    Open bins are grouped by free space, kept in a sorted list of distinct free sizes (at most `capacity`
    of them), so finding the tightest fit is one bisection however many bins are open."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    free_sizes: list[int] = []  # distinct free sizes that at least one open bin has, ascending
    bins_by_free: dict[int, list[int]] = {}
    for index in order:
        size = int(lengths[index])
        if size > capacity:
            raise ValueError(f"a sample of {size} tokens cannot fit a row of {capacity}")
        position = bisect_left(free_sizes, size)
        if position < len(free_sizes):
            free = free_sizes[position]
            candidates = bins_by_free[free]
            target = candidates.pop()
            if not candidates:
                del bins_by_free[free]
                free_sizes.pop(position)
        else:
            target, free = len(bins), capacity
            bins.append([])
        bins[target].append(index)
        left = free - size
        if left > 0:
            if left not in bins_by_free:
                bins_by_free[left] = []
                insort(free_sizes, left)
            bins_by_free[left].append(target)
    return bins


@dataclass(frozen=True)
class PackedRow:
    """Several samples in one row; the collator keeps their attention and positions apart."""

    samples: tuple[EncodedSample, ...]

    @property
    def input_ids(self):
        import numpy as np

        return np.concatenate([np.asarray(s.input_ids) for s in self.samples])

    @property
    def labels(self):
        import numpy as np

        parts = []
        for sample in self.samples:
            labels = np.array(sample.labels, dtype=np.int64)
            labels[0] = IGNORE_INDEX  # nothing in this sample predicts its first token
            parts.append(labels)
        return np.concatenate(parts)

    @property
    def num_label_tokens(self) -> int:
        return sum(sample.num_label_tokens for sample in self.samples)

    def __len__(self) -> int:
        return sum(len(sample.input_ids) for sample in self.samples)


class TrainRows(Sequence):
    """The rows the sampler draws from: `slots` index samples of `table` (a sample appears once per use,
    so mixing weights repeat it); with packing, each row is a bin of slots, else one slot per row."""

    def __init__(self, table: TokenTable, slots, max_seq_len: int, packing: bool):
        import numpy as np

        self.table = table
        self.slots = np.asarray(slots, dtype=np.int64)
        self.max_seq_len = max_seq_len
        self.packing = packing
        slot_lengths = table.lengths[self.slots] if len(self.slots) else np.zeros(0, dtype=np.int64)
        if packing:
            bins = best_fit_decreasing(slot_lengths.tolist(), max_seq_len)
            self.row_starts = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int64)
            self.row_members = np.asarray([i for b in bins for i in b], dtype=np.int64)
        else:
            self.row_starts = np.arange(len(self.slots) + 1, dtype=np.int64)
            self.row_members = np.arange(len(self.slots), dtype=np.int64)
        self.num_tokens = int(slot_lengths.sum())

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        members = self.row_members[self.row_starts[index]:self.row_starts[index + 1]]
        samples = tuple(self.table.sample(int(self.slots[m])) for m in members)
        return PackedRow(samples) if self.packing else samples[0]

    @property
    def num_samples(self) -> int:
        return len(self.slots)

    @property
    def efficiency(self) -> float:
        """Real tokens over the slots of full-length rows: what packing buys (1.0 is every slot used)."""
        return self.num_tokens / max(len(self) * self.max_seq_len, 1)


def padding_efficiency(lengths: Sequence[int], micro_batch_size: int, seed: int = 0) -> float:
    """Real tokens over padded slots for unpacked micro batches in a random order, each padded to its longest row."""
    import numpy as np

    lengths = np.asarray(lengths, dtype=np.int64)
    if not len(lengths):
        return 0.0
    shuffled = lengths[np.random.default_rng(seed).permutation(len(lengths))]
    slots = sum(int(shuffled[i:i + micro_batch_size].max()) * len(shuffled[i:i + micro_batch_size])
                for i in range(0, len(shuffled), micro_batch_size))
    return float(lengths.sum()) / max(slots, 1)
