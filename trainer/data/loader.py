"""Batches for training: a resumable sampler whose global batch does not depend on the world size.

Every optimizer step consumes one global batch of rows, drawn from a seeded per-epoch permutation.
Each rank takes its own micro batches out of that global batch, so 1, 2 or 8 ranks see the same data
at every step, and a checkpoint's (epoch, position) resumes exactly on any world size. A row is one
sample, or with packing several (`packing.PackedRow`); packing happens once, identically on every rank,
so the rows and their order never depend on the world size either.

`collate` turns rows into model inputs. Packed rows get position ids that restart at every sample and an
attention mask that stops at sample boundaries: a block-diagonal causal 4D mask for sdpa/eager (boolean
for sdpa, additive for eager, which adds it to the scores), or, for flash_attention_2, one flattened
row without padding whose restarting position ids make Transformers run variable-length attention (its
packed-sequence detection only looks at batches of one row).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.data.encode import IGNORE_INDEX


@dataclass
class SamplerState:
    epoch: int = 0
    position: int = 0  # rows of this epoch already consumed


class GlobalBatchSampler:
    def __init__(self, num_rows: int, global_batch_size: int, seed: int, shuffle: bool = True,
                 data_fingerprint: str | None = None, max_steps_per_epoch: int = 0):
        if num_rows < global_batch_size:
            raise ValueError(f"{num_rows} rows cannot fill one global batch of {global_batch_size}")
        self.num_rows = num_rows
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.shuffle = shuffle
        # Identifies the rows (data, tokenizer, template, length, packing): resuming on other rows is refused.
        self.data_fingerprint = data_fingerprint
        self.max_steps_per_epoch = max_steps_per_epoch  # 0: an epoch is all the rows
        self.state = SamplerState()
        self._order_epoch = -1
        self._order: np.ndarray | None = None

    @property
    def steps_per_epoch(self) -> int:
        full = self.num_rows // self.global_batch_size  # the incomplete tail is dropped, reshuffled next epoch
        return min(full, self.max_steps_per_epoch) if self.max_steps_per_epoch else full

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            if self.shuffle:
                self._order = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            else:
                self._order = np.arange(self.num_rows)
            self._order_epoch = epoch
        return self._order

    def next_global_batch(self) -> list[int]:
        if self.state.position + self.global_batch_size > self.num_rows \
                or self.state.position >= self.steps_per_epoch * self.global_batch_size:
            self.state = SamplerState(self.state.epoch + 1, 0)
        order = self._epoch_order(self.state.epoch)
        start = self.state.position
        self.state.position += self.global_batch_size
        return [int(i) for i in order[start:start + self.global_batch_size]]

    def state_dict(self) -> dict:
        state = {"epoch": self.state.epoch, "position": self.state.position, "num_rows": self.num_rows,
                 "global_batch_size": self.global_batch_size, "seed": self.seed}
        if self.data_fingerprint:
            state["data_fingerprint"] = self.data_fingerprint
        return state

    def load_state_dict(self, state: dict) -> None:
        if state["num_rows"] != self.num_rows or state["global_batch_size"] != self.global_batch_size:
            raise ValueError(f"the checkpoint's data ({state['num_rows']} rows, global batch "
                             f"{state['global_batch_size']}) differs from this run's ({self.num_rows} rows, "
                             f"global batch {self.global_batch_size}): resume with the same data and batch size")
        saved = state.get("data_fingerprint")
        if saved and self.data_fingerprint and saved != self.data_fingerprint:
            raise ValueError(f"the checkpoint was trained on other data rows (fingerprint {saved}, now "
                             f"{self.data_fingerprint}): the data files, tokenizer, template, max_seq_len or packing "
                             "changed; resume with the same data settings")
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
    token_mask: object = None  # [batch, seq] 1 on real tokens, 0 on padding (None: no padding), e.g. for MoE losses
    desirable: object = None  # KTO: bool [m], whether each of the micro batch's m answers is desirable
    # Packed preference rows: per sample, in the objective's order, (row, start, end) of its tokens (None: one sample
    # per row, row i is sample i)
    spans: object = None

    def to(self, device) -> "Batch":
        # To a GPU from page-locked memory, asynchronously: the host goes on queueing the step's kernels meanwhile.
        on_gpu = getattr(device, "type", str(device).split(":")[0]) == "cuda"

        def moved(tensor):
            if tensor is None:
                return None
            return tensor.pin_memory().to(device, non_blocking=True) if on_gpu else tensor.to(device)

        return Batch({k: moved(v) for k, v in self.inputs.items()}, moved(self.labels), self.num_tokens,
                     moved(self.token_mask), moved(self.desirable), self.spans)


def collate(rows: list, pad_id: int, attention: str = "sdpa") -> Batch:
    """Model inputs for a micro batch of rows (`EncodedSample`s or `PackedRow`s).

    `attention` is the model's attention implementation (model.attn_implementation); it decides how packed
    rows are kept apart (see the module doc)."""
    if all(len(row.samples) == 1 for row in rows):
        return _collate_padded(rows, pad_id)
    if attention == "flash_attention_2":
        return _collate_flattened(rows)
    return _collate_block_diagonal(rows, pad_id, additive_mask=attention == "eager")


def _collate_padded(rows: list, pad_id: int) -> Batch:
    """One sample per row: right-pad to the longest row; pads are masked out of attention and the loss."""
    import numpy as np
    import torch

    length = max(len(row.input_ids) for row in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    attention_mask = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        input_ids[i, :n] = row.input_ids
        labels[i, :n] = row.labels
        attention_mask[i, :n] = 1
    mask = torch.from_numpy(attention_mask)
    return Batch({"input_ids": torch.from_numpy(input_ids), "attention_mask": mask}, torch.from_numpy(labels),
                 int(attention_mask.sum()), mask)


def _segments(rows: list, pad_id: int):
    """Padded ids, labels, per-sample position ids and per-sample segment numbers (the pad tail is a segment
    of its own, so every query attends to at least itself and no softmax row is empty)."""
    import numpy as np

    length = max(len(row) for row in rows)
    input_ids = np.full((len(rows), length), pad_id, dtype=np.int64)
    labels = np.full((len(rows), length), IGNORE_INDEX, dtype=np.int64)
    position_ids = np.zeros((len(rows), length), dtype=np.int64)
    segment = np.zeros((len(rows), length), dtype=np.int64)
    for i, row in enumerate(rows):
        start = 0
        for number, sample in enumerate(row.samples):
            end = start + len(sample.input_ids)
            input_ids[i, start:end] = sample.input_ids
            labels[i, start:end] = sample.labels
            labels[i, start] = IGNORE_INDEX  # the previous sample's last token must not learn to predict it
            position_ids[i, start:end] = np.arange(end - start)
            segment[i, start:end] = number
            start = end
        position_ids[i, start:] = np.arange(length - start)
        segment[i, start:] = len(row.samples)
    return input_ids, labels, position_ids, segment


def _collate_block_diagonal(rows: list, pad_id: int, additive_mask: bool) -> Batch:
    import torch

    input_ids, labels, position_ids, segment = (torch.from_numpy(a) for a in _segments(rows, pad_id))
    length = input_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = (segment[:, :, None] == segment[:, None, :]) & causal  # [batch, query, key]
    mask = mask[:, None, :, :]  # one mask for all heads
    if additive_mask:  # eager attention adds the mask to the scores
        mask = torch.zeros(mask.shape, dtype=torch.float32).masked_fill_(~mask, torch.finfo(torch.float32).min)
    num_tokens = sum(len(row) for row in rows)
    real = segment < torch.tensor([len(row.samples) for row in rows])[:, None]  # the pad tail is the last segment
    return Batch({"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids}, labels, num_tokens,
                 real.long())


def _collate_flattened(rows: list) -> Batch:
    """All samples of the micro batch in one row with no padding; restarting position ids mark the samples."""
    import numpy as np
    import torch

    samples = [sample for row in rows for sample in row.samples]
    input_ids = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples])
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in samples])
    starts = np.cumsum([0] + [len(s.input_ids) for s in samples[:-1]])
    labels[starts] = IGNORE_INDEX
    position_ids = np.concatenate([np.arange(len(s.input_ids), dtype=np.int64) for s in samples])
    return Batch({"input_ids": torch.from_numpy(input_ids)[None], "position_ids": torch.from_numpy(position_ids)[None]},
                 torch.from_numpy(labels)[None], len(input_ids))
