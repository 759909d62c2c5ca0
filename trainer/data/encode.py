"""Tokenise samples into input ids and labels, masking what the loss must not see.

Segments are tokenised one by one and concatenated, so the boundary between prompt and answer is
exact; labels are -100 on masked tokens. BOS starts a sample when the tokenizer has one, EOS ends it
so the model learns where to stop.
"""

from __future__ import annotations

from dataclasses import dataclass

from trainer.data.formats import Sample

IGNORE_INDEX = -100


@dataclass
class EncodedSample:
    input_ids: list[int]
    labels: list[int]

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss is computed on: labels are shifted by one, so the first never counts."""
        return sum(1 for label in self.labels[1:] if label != IGNORE_INDEX)


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0


def encode_sample(sample: Sample, tokenizer, train_on_inputs: bool) -> EncodedSample:
    input_ids: list[int] = []
    labels: list[int] = []
    if tokenizer.bos_token_id is not None:
        input_ids.append(tokenizer.bos_token_id)
        labels.append(IGNORE_INDEX)
    for text, trainable in sample.segments:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids.extend(ids)
        labels.extend(ids if (trainable or train_on_inputs) else [IGNORE_INDEX] * len(ids))
    if tokenizer.eos_token_id is not None:
        input_ids.append(tokenizer.eos_token_id)
        labels.append(tokenizer.eos_token_id)
    return EncodedSample(input_ids, labels)


def encode_samples(samples: list[Sample], tokenizer, max_seq_len: int, train_on_inputs: bool,
                   truncation: str = "truncate") -> tuple[list[EncodedSample], EncodeStats]:
    """Encode, then truncate or drop over-long samples; samples left with no label token are dropped."""
    stats = EncodeStats()
    encoded: list[EncodedSample] = []
    for sample in samples:
        item = encode_sample(sample, tokenizer, train_on_inputs)
        if len(item.input_ids) > max_seq_len:
            if truncation == "drop":
                stats.dropped_too_long += 1
                continue
            item = EncodedSample(item.input_ids[:max_seq_len], item.labels[:max_seq_len])
            stats.truncated += 1
        if item.num_label_tokens == 0:
            stats.dropped_no_labels += 1
            continue
        encoded.append(item)
        stats.kept += 1
    return encoded, stats
