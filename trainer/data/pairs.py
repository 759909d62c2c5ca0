"""Preference pairs for the preference objectives (trainer/objectives/preference.py).

A pair is one record's chosen and rejected answers to the same prompt. Both sides are rendered with the run's
template and tokenised as SFT samples are; only the final answer is trained (its tokens are the ones whose
log-probabilities are compared), so earlier turns of a multi-turn prompt count as prompt. A pair whose either side
is dropped (too long for data.truncation=drop, nothing left to train on) is left out whole, and counted.

The sampler draws pairs, never sides: a global batch of N counts N pairs, and a micro batch holds whole pairs, so
the two answers of a pair are never split across micro batches or ranks. Pairs are not packed: each side is one
padded row (the micro batch is [chosen_1..chosen_m, rejected_1..rejected_m]).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trainer.data.formats import Example
from trainer.errors import DataError


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    chosen: object  # EncodedSample
    rejected: object  # EncodedSample

    @property
    def samples(self) -> tuple:
        return self.chosen, self.rejected

    @property
    def num_label_tokens(self) -> int:
        return self.chosen.num_label_tokens + self.rejected.num_label_tokens

    def __len__(self) -> int:
        return len(self.chosen) + len(self.rejected)


def _answer_only(messages) -> tuple:
    """Every turn but the last trained as prompt: the pair's answers are what the objective compares."""
    return tuple(dataclasses.replace(m, trainable=False) for m in messages[:-1]) + (messages[-1],)


def preference_examples(parsed):
    """`parsed` with only the final answers trained; refuses sources without pairs (the objective needs them)."""
    examples = []
    for source, (source_examples, report) in enumerate(zip(parsed.examples, parsed.reports)):
        if source_examples and not any(e.rejected for e in source_examples):
            raise DataError(report.path, None, f"holds no preference pairs (format {parsed.formats[source]!r}), "
                            "and a preference objective trains on chosen/rejected pairs: give it a file of "
                            "prompt/chosen/rejected records, or use objective=sft")
        examples.append([dataclasses.replace(e, messages=_answer_only(e.messages)) for e in source_examples
                         if e.rejected])
    return dataclasses.replace(parsed, examples=examples)


def rejected_example(example: Example) -> Example:
    prompt = example.messages[:-1]
    return dataclasses.replace(example, messages=tuple(prompt) + tuple(example.rejected), rejected=())


def add_rejected_sides(arrays: dict, meta: dict, splits, template, tokenizer, cfg, report) -> None:
    """Encode the rejected side of every kept chosen sample of each split into `{role}_rejected_*` arrays, with
    `{role}_pair`: per chosen sample, its rejected row (-1: dropped, so the pair is left out)."""
    import numpy as np

    from trainer.data.pipeline import _encode_split

    for role, examples in zip(("train", "val", "test"), splits):
        kept = arrays[f"{role}_example"]
        _, table, kept_rejected, _, _ = _encode_split([rejected_example(examples[k]) for k in kept], template,
                                                      tokenizer, cfg)
        pair = np.full(len(kept), -1, dtype=np.int64)
        pair[np.asarray(kept_rejected, dtype=np.int64)] = np.arange(len(kept_rejected), dtype=np.int64)
        arrays.update({f"{role}_rejected_ids": table.input_ids, f"{role}_rejected_trained": table.trained,
                       f"{role}_rejected_offsets": table.offsets, f"{role}_pair": pair})
    whole = arrays["train_pair"][arrays["train_slots"]] >= 0
    report.pairs = True
    report.pairs_dropped = int((~whole).sum())
    arrays["train_slots"] = arrays["train_slots"][whole]
    report.num_train_samples = int(whole.sum())


class PairRows(Sequence):
    """The pairs the sampler draws from: `slots` index chosen samples, each with its rejected side."""

    def __init__(self, chosen, rejected, pair, slots):
        import numpy as np

        self.chosen, self.rejected, self.pair = chosen, rejected, pair
        self.table = chosen  # what `trainer data check` shows and measures: the chosen sides
        self.slots = np.asarray(slots, dtype=np.int64)
        self.packing = False
        self.num_tokens = int(chosen.lengths[self.slots].sum() + rejected.lengths[pair[self.slots]].sum()) \
            if len(self.slots) else 0

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        slot = int(self.slots[index])
        return PreferencePair(self.chosen.sample(slot), self.rejected.sample(int(self.pair[slot])))

    @property
    def num_samples(self) -> int:
        return len(self.slots)

    @property
    def efficiency(self) -> float:
        return 0.0


def split_pairs(arrays: dict, role: str) -> list[PreferencePair]:
    from trainer.data.encode import TokenTable

    chosen = TokenTable(arrays[f"{role}_ids"], arrays[f"{role}_trained"], arrays[f"{role}_offsets"])
    rejected = TokenTable(arrays[f"{role}_rejected_ids"], arrays[f"{role}_rejected_trained"],
                          arrays[f"{role}_rejected_offsets"])
    pair = arrays[f"{role}_pair"]
    return [PreferencePair(chosen.sample(i), rejected.sample(int(pair[i]))) for i in range(len(chosen)) if pair[i] >= 0]


def pair_datasets(arrays: dict, meta: dict, cfg, cache_key: str, cache_status: str):
    """Datasets whose train rows are PreferencePairs; `val`/`test` hold the chosen sides (for the eval loss and
    generation metrics, as for SFT) and `val_pairs`/`test_pairs` the whole pairs."""
    from trainer.data.cache import fingerprint
    from trainer.data.encode import EncodeStats, TokenTable
    from trainer.data.formats import Sample
    from trainer.data.pipeline import Datasets, Origins
    from trainer.data.report import DataReport

    def table(role: str, side: str = "") -> TokenTable:
        return TokenTable(arrays[f"{role}{side}_ids"], arrays[f"{role}{side}_trained"], arrays[f"{role}{side}_offsets"])

    def whole(role: str) -> list[int]:
        return [i for i in range(len(arrays[f"{role}_pair"])) if arrays[f"{role}_pair"][i] >= 0]

    def samples(role: str) -> list[Sample]:
        rows = meta[f"{role}_samples"]
        return [Sample((), rows[i][2], rows[i][3], rows[i][0], rows[i][1]) for i in whole(role)]

    train = PairRows(table("train"), table("train", "_rejected"), arrays["train_pair"], arrays["train_slots"])
    report = DataReport.from_dict(meta["report"])
    report.packing, report.num_rows, report.cache = False, len(train), cache_status
    val_table, test_table = table("val"), table("test")
    data = Datasets(train, [val_table.sample(i) for i in whole("val")], samples("val"),
                    EncodeStats(**meta["train_stats"]), meta["num_train_records"],
                    [test_table.sample(i) for i in whole("test")], samples("test"), report,
                    fingerprint({"content": cache_key, "pairs": True}),
                    Origins(arrays["train_source"], arrays["train_file"], arrays["train_line"], meta["train_paths"]))
    data.val_pairs, data.test_pairs = split_pairs(arrays, "val"), split_pairs(arrays, "test")
    return data
