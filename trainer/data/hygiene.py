"""Data hygiene: de-duplication (exact and normalised text), seeded splits, and mixing weights.

Duplicates are always counted, and removed only when `data.dedup` asks; the first occurrence is kept, in
source order. Splits and weighted subsets are drawn from seeded generators, so one seed always gives the
same records in the same places.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass
from typing import Sequence

from trainer.data.formats import Example

_NOT_WORD = re.compile(r"[\W_]+")  # punctuation, symbols and whitespace runs: one regex pass in C
_SPLIT_SALT = 7919
_WEIGHT_SALT = 104729


def normalize_text(text: str) -> str:
    """Case-folded, Unicode-normalised, punctuation and symbols dropped, whitespace collapsed."""
    return _NOT_WORD.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def exact_key(example: Example) -> bytes:
    return _digest(example.text_key())


def normalized_key(example: Example) -> bytes:
    return _digest(normalize_text(example.text_key()))


@dataclass
class Duplicates:
    """Which examples repeat an earlier one: `exact` (same text) or `normalized` (same after normalising only)."""

    kind: list[str | None]  # per example: None, "exact" or "normalized"
    removed: list[bool]  # per example: dropped under the configured data.dedup

    def count(self, kind: str, indices: Sequence[int] | None = None) -> int:
        chosen = range(len(self.kind)) if indices is None else indices
        return sum(1 for i in chosen if self.kind[i] == kind)


def find_duplicates(examples: Sequence[Example], mode: str) -> Duplicates:
    """Mark later repeats; `mode` none|exact|normalized decides which of them are removed."""
    seen_exact: set[bytes] = set()
    seen_normalized: set[bytes] = set()
    kinds: list[str | None] = []
    for example in examples:
        exact, normal = exact_key(example), normalized_key(example)
        if exact in seen_exact:
            kinds.append("exact")
        elif normal in seen_normalized:
            kinds.append("normalized")
        else:
            kinds.append(None)
        seen_exact.add(exact)
        seen_normalized.add(normal)
    removable = {"none": (), "exact": ("exact",), "normalized": ("exact", "normalized")}[mode]
    return Duplicates(kinds, [kind in removable for kind in kinds])


def held_out_sizes(num: int, val_ratio: float, test_ratio: float) -> tuple[int, int]:
    """Records held out for validation and test: at least one each when its ratio is set, never all of them."""
    if num < 2:
        return 0, 0
    num_val = max(1, int(round(num * val_ratio))) if val_ratio > 0 else 0
    num_test = max(1, int(round(num * test_ratio))) if test_ratio > 0 else 0
    while num_val + num_test >= num:
        if num_test > num_val:
            num_test -= 1
        else:
            num_val -= 1
    return num_val, num_test


def split_indices(num: int, val_ratio: float, test_ratio: float, seed: int,
                  stream: int = 0) -> tuple[list[int], list[int], list[int]]:
    """A seeded (train, val, test) split of range(num); each part keeps the original order."""
    import numpy as np

    num_val, num_test = held_out_sizes(num, val_ratio, test_ratio)
    if not num_val and not num_test:
        return list(range(num)), [], []
    order = np.random.default_rng([seed, _SPLIT_SALT, stream]).permutation(num)
    val = set(order[:num_val].tolist())
    test = set(order[num_val:num_val + num_test].tolist())
    train = [i for i in range(num) if i not in val and i not in test]
    return train, sorted(val), sorted(test)


def apply_weight(indices: Sequence[int], weight: float, seed: int, stream: int = 0) -> list[int]:
    """Each index `int(weight)` times, plus a seeded subset for the fraction (weight 2.5: twice, and half once more)."""
    import numpy as np

    whole = int(weight)
    fraction = weight - whole
    result = list(indices) * whole
    extra = int(round(len(indices) * fraction))
    if extra:
        chosen = np.random.default_rng([seed, _WEIGHT_SALT, stream]).choice(len(indices), size=extra, replace=False)
        result.extend(indices[i] for i in sorted(chosen.tolist()))
    return result
