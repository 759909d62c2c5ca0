"""Tokenise rendered samples into one flat token table, with a trained/not-trained flag per token.

A sample's segments are tokenised as one text (in large batches, for speed), as generation and serving will
tokenise the conversation: SentencePiece-style tokenizers (Llama 2, Mistral, Phi-3) write a word prefix "▁" at
the start of every text they are given, so an answer tokenised on its own after "<|assistant|>\n" would start
with a token the model never sees there. A token is trained when any character it covers (from the tokenizer's
offsets) belongs to a trained segment, so an answer's first token is trained even when it also holds the
prompt's last character. Slow (Python) tokenizers, which give no offsets, tokenise segment by segment. BOS
starts a sample when the tokenizer has one and the template did not write it; EOS ends it, trained, unless the
template's end-of-turn marker already is the EOS token. The first token's label never counts (nothing predicts
it), which also keeps the label count of a sample the same whether it sits alone in a row or packed behind
another.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from trainer.data.formats import Sample

IGNORE_INDEX = -100
TOKENIZE_BATCH = 1024


@dataclass(frozen=True)
class EncodedSample:
    """One sample's token ids and labels (IGNORE_INDEX where no loss is taken)."""

    input_ids: Sequence[int]
    labels: Sequence[int]

    @property
    def num_label_tokens(self) -> int:
        """Tokens the loss is computed on: labels are shifted by one, so the first never counts."""
        import numpy as np

        return int((np.asarray(self.labels[1:]) != IGNORE_INDEX).sum())

    @property
    def samples(self) -> tuple["EncodedSample", ...]:
        return (self,)

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    kept: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_labels: int = 0


class TokenTable:
    """Every sample's tokens in three flat arrays: ids (int32), trained flags, and offsets (n + 1)."""

    def __init__(self, input_ids, trained, offsets):
        import numpy as np

        self.input_ids = np.asarray(input_ids, dtype=np.int32)
        self.trained = np.asarray(trained, dtype=bool)
        self.offsets = np.asarray(offsets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self):
        import numpy as np

        return np.diff(self.offsets)

    @property
    def label_counts(self):
        """Trained tokens per sample (the first token of a sample is never trained, see the module doc)."""
        import numpy as np

        cumulative = np.concatenate([[0], np.cumsum(self.trained, dtype=np.int64)])
        return cumulative[self.offsets[1:]] - cumulative[self.offsets[:-1]]

    def sample(self, index: int) -> EncodedSample:
        import numpy as np

        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        ids = self.input_ids[start:end]
        return EncodedSample(ids, np.where(self.trained[start:end], ids, IGNORE_INDEX))


def _tokenize_samples(tokenizer, samples: Sequence[Sample]) -> list[tuple[list[int], list[bool], list[int]]]:
    """Per sample: its token ids (no special tokens added), whether each is trained, and the ids of its last trained
    segment (to see whether the answer already ends with EOS)."""
    import numpy as np

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return [_tokenize_segments(tokenizer, sample) for sample in samples]
    texts = ["".join(text for text, _ in sample.segments) for sample in samples]
    encodings = backend.encode_batch(texts, add_special_tokens=False) if texts else []
    results = []
    for sample, encoding in zip(samples, encodings):
        ids = encoding.ids
        if not ids:
            results.append(([], [], []))
            continue
        ends = np.cumsum([len(text) for text, _ in sample.segments])
        trainable = np.asarray([flag for _, flag in sample.segments], dtype=np.int64)
        trainable_before = np.concatenate([[0], np.cumsum(trainable)])
        spans = np.asarray(encoding.offsets, dtype=np.int64).reshape(-1, 2)
        first_char, last_char = spans[:, 0], np.maximum(spans[:, 1], spans[:, 0] + 1) - 1
        # Segment of each token's first and last character; trained if a trainable segment lies between them.
        first_seg = np.minimum(np.searchsorted(ends, first_char, side="right"), len(ends) - 1)
        last_seg = np.minimum(np.searchsorted(ends, last_char, side="right"), len(ends) - 1)
        trained = (trainable_before[last_seg + 1] - trainable_before[first_seg]) > 0
        last_trainable = int(np.flatnonzero(trainable)[-1]) if trainable.any() else -1
        in_last = (first_seg <= last_trainable) & (last_seg >= last_trainable)
        results.append((list(ids), trained.tolist(), [ids[i] for i in np.flatnonzero(in_last)]))
    return results


def _tokenize_segments(tokenizer, sample: Sample) -> tuple[list[int], list[bool], list[int]]:
    ids: list[int] = []
    trained: list[bool] = []
    last_trained_ids: list[int] = []
    for text, trainable in sample.segments:
        segment_ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        ids.extend(segment_ids)
        trained.extend([trainable] * len(segment_ids))
        if trainable:
            last_trained_ids = segment_ids
    return ids, trained, last_trained_ids


def _special(tokenizer) -> tuple[int | None, str | None, int | None]:
    return tokenizer.bos_token_id, tokenizer.bos_token, tokenizer.eos_token_id


def _is_plain_text(sample: Sample) -> bool:
    """A document of the text format: every segment trained, no prompt (conversations and completions have one)."""
    return bool(sample.segments) and not sample.prompt and all(trainable for _, trainable in sample.segments)


def _windows(ids: list[int], trained: list[bool], max_seq_len: int) -> list[tuple[list[int], list[bool]]]:
    """A long document as consecutive windows of max_seq_len tokens (continued pre-training reads all of it). The
    first token of each window carries no loss, as at the start of any sample; a last window of one token, which
    would carry none at all, is left out."""
    windows = []
    for start in range(0, len(ids), max_seq_len):
        window_ids, window_trained = ids[start:start + max_seq_len], trained[start:start + max_seq_len]
        if len(window_ids) >= 2:
            windows.append((window_ids, [False] + window_trained[1:]))
    return windows


def encode_samples(samples: Sequence[Sample], tokenizer, max_seq_len: int, train_on_inputs: bool,
                   truncation: str = "truncate", chunk_text: bool = False,
                   ) -> tuple[TokenTable, list[int], dict[str, list[int]], EncodeStats]:
    """Encode, then truncate or drop over-long samples (or, with CHUNK_TEXT, split over-long plain-text documents into
    windows); samples left with no trained token are dropped.

    Returns the table of kept samples, their indices into `samples` (a chunked document's index once per window),
    the indices that were `truncated`, `chunked` (and each of their `windows`), dropped as `too_long` or dropped
    with `no_labels`, and the counts."""
    import numpy as np

    bos_id, bos_token, eos_id = _special(tokenizer)
    stats = EncodeStats()
    kept: list[int] = []
    events: dict[str, list[int]] = {"truncated": [], "chunked": [], "windows": [], "too_long": [], "no_labels": []}
    id_chunks, trained_chunks, lengths = [], [], []
    for start in range(0, len(samples), TOKENIZE_BATCH):
        batch = samples[start:start + TOKENIZE_BATCH]
        encoded = _tokenize_samples(tokenizer, batch)
        for offset, sample in enumerate(batch):
            ids: list[int] = []
            trained: list[bool] = []
            template_wrote_bos = bool(sample.segments and bos_token and sample.segments[0][0].startswith(bos_token))
            if bos_id is not None and not template_wrote_bos:
                ids.append(bos_id)
                trained.append(False)
            sample_ids, sample_trained, last_trained_ids = encoded[offset]
            ids.extend(sample_ids)
            trained.extend(flag or train_on_inputs for flag in sample_trained)
            if eos_id is not None and eos_id not in last_trained_ids:
                ids.append(eos_id)
                trained.append(True)
            if trained:
                trained[0] = False
            if len(ids) > max_seq_len and chunk_text and _is_plain_text(sample):
                windows = _windows(ids, trained, max_seq_len)
                events["chunked"].append(start + offset)
                for window_ids, window_trained in windows:
                    events["windows"].append(start + offset)
                    id_chunks.append(np.asarray(window_ids, dtype=np.int32))
                    trained_chunks.append(np.asarray(window_trained, dtype=bool))
                    lengths.append(len(window_ids))
                    kept.append(start + offset)
                continue
            if len(ids) > max_seq_len:
                if truncation == "drop":
                    stats.dropped_too_long += 1
                    events["too_long"].append(start + offset)
                    continue
                ids, trained = ids[:max_seq_len], trained[:max_seq_len]
                if any(trained):
                    stats.truncated += 1
                    events["truncated"].append(start + offset)
            if not any(trained):
                stats.dropped_no_labels += 1
                events["no_labels"].append(start + offset)
                continue
            id_chunks.append(np.asarray(ids, dtype=np.int32))
            trained_chunks.append(np.asarray(trained, dtype=bool))
            lengths.append(len(ids))
            kept.append(start + offset)
    stats.kept = len(kept)
    offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
    table = TokenTable(np.concatenate(id_chunks) if id_chunks else np.zeros(0, np.int32),
                       np.concatenate(trained_chunks) if trained_chunks else np.zeros(0, bool), offsets)
    return table, kept, events, stats
