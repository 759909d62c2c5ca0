"""Preference pairs for the preference objectives (trainer/objectives/preference.py, kto.py).

A pair is one record's chosen and rejected answers to the same prompt. Both sides are rendered with the run's
template and tokenised as SFT samples are; only the final answer is trained (its tokens are the ones whose
log-probabilities are compared), so earlier turns of a multi-turn prompt count as prompt. A pair whose either side
is dropped (too long for data.truncation=drop, nothing left to train on) is left out whole, and counted.

The sampler draws pairs, never sides: a global batch of N counts N pairs, and a micro batch holds whole pairs, so
the two answers of a pair are never split across micro batches or ranks. A micro batch is [chosen_1..chosen_m,
rejected_1..rejected_m]: each side one padded row, or, with data.packing, the 2m answers packed into rows of
max_seq_len tokens when the micro batch is collated (trainer/objectives/preference.py), so packing never moves an
answer to another micro batch or rank.

KTO trains on single answers labelled desirable or not (KTO files' `label`; a preference pair gives its chosen
answer as desirable and its rejected one as undesirable). Its KL estimate needs each answer's prompt beside an
unrelated answer, so every KTO item is a pair too: (prompt + its answer, the same prompt + the answer of another
record of the same split), with a `desirable` flag; the mismatch is drawn once, with the run's seed, so the
reference pass, every epoch and a resume see the same rows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from trainer.data.formats import Example, Message
from trainer.errors import DataError


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    chosen: object  # EncodedSample; KTO: the answer
    rejected: object  # EncodedSample; KTO: the answer's prompt with a mismatched answer (for the KL estimate)
    desirable: bool | None = None  # KTO: the answer's label

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


def kto_examples(parsed):
    """`parsed` as KTO items: each labelled answer, and each preference pair's chosen answer (desirable) and rejected
    one (undesirable); only the final answer is trained. Refuses sources with neither labels nor pairs."""
    examples = []
    for source, (source_examples, report) in enumerate(zip(parsed.examples, parsed.reports)):
        items = []
        for example in source_examples:
            if example.rejected:
                answered = rejected_example(example)
                items += [dataclasses.replace(example, messages=_answer_only(example.messages), rejected=(),
                                              desirable=True),
                          dataclasses.replace(answered, messages=_answer_only(answered.messages), desirable=False)]
            elif example.desirable is not None:
                messages = _answer_only(example.messages) if example.messages else ()
                items.append(dataclasses.replace(example, messages=messages))
        if source_examples and not items:
            raise DataError(report.path, None, f"holds no labelled answers or preference pairs (format "
                            f"{parsed.formats[source]!r}), and objective.name=kto trains on answers labelled "
                            "desirable or not: give it records with a boolean \"label\" (KTO files) or "
                            "prompt/chosen/rejected pairs, or use objective=sft")
        examples.append(items)
    return dataclasses.replace(parsed, examples=examples)


def with_mismatched_answers(examples: list[Example], seed: int, stream: int) -> list[Example]:
    """Each KTO item with the final answer of another item of the same split as its `rejected` side: the items in a
    seeded random order, each taking its successor's answer (KTO's KL estimate compares the policy and the
    reference on such unrelated prompt/answer pairs)."""
    import numpy as np

    if not examples:
        return examples
    order = np.random.default_rng([seed, stream, 0x6B746F]).permutation(len(examples))
    out = list(examples)
    for position, index in enumerate(order):
        other = examples[int(order[(position + 1) % len(order)])]
        answer = other.messages[-1] if other.messages else Message("assistant", other.raw[-1][0])
        out[int(index)] = dataclasses.replace(examples[int(index)], rejected=(answer,))
    return out


def rejected_example(example: Example) -> Example:
    """The example with its rejected (KTO: mismatched) answer in place of its final one."""
    if example.raw:  # prompt/completion text: the prompt segments, then the other answer
        return dataclasses.replace(example, raw=example.raw[:-1] + ((example.rejected[-1].content, True),),
                                   rejected=())
    prompt = example.messages[:-1]
    return dataclasses.replace(example, messages=tuple(prompt) + tuple(example.rejected), rejected=())


def add_rejected_sides(arrays: dict, meta: dict, splits, template, tokenizer, cfg, report) -> None:
    """Encode the rejected side of every kept chosen sample of each split into `{role}_rejected_*` arrays, with
    `{role}_pair`: per chosen sample, its rejected row (-1: dropped, so the pair is left out), and for KTO items
    `{role}_desirable` (1/0)."""
    import numpy as np

    from trainer.data.pipeline import _encode_split

    unpaired = any(e.desirable is not None for split in splits for e in split)
    for role, examples in zip(("train", "val", "test"), splits):
        kept = arrays[f"{role}_example"]
        _, table, kept_rejected, _, _ = _encode_split([rejected_example(examples[k]) for k in kept], template,
                                                      tokenizer, cfg)
        pair = np.full(len(kept), -1, dtype=np.int64)
        pair[np.asarray(kept_rejected, dtype=np.int64)] = np.arange(len(kept_rejected), dtype=np.int64)
        arrays.update({f"{role}_rejected_ids": table.input_ids, f"{role}_rejected_trained": table.trained,
                       f"{role}_rejected_offsets": table.offsets, f"{role}_pair": pair})
        if unpaired:
            arrays[f"{role}_desirable"] = np.asarray([bool(examples[k].desirable) for k in kept], dtype=np.int8)
    whole = arrays["train_pair"][arrays["train_slots"]] >= 0
    report.pairs = True
    report.pairs_dropped = int((~whole).sum())
    arrays["train_slots"] = arrays["train_slots"][whole]
    report.num_train_samples = int(whole.sum())
    if unpaired:
        labels = arrays["train_desirable"][arrays["train_slots"]]
        report.desirable, report.undesirable = int(labels.sum()), int((1 - labels).sum())


class PairRows(Sequence):
    """The pairs the sampler draws from: `slots` index chosen samples, each with its rejected side."""

    def __init__(self, chosen, rejected, pair, slots, desirable=None):
        import numpy as np

        self.chosen, self.rejected, self.pair, self.desirable = chosen, rejected, pair, desirable
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
        label = None if self.desirable is None else bool(self.desirable[slot])
        return PreferencePair(self.chosen.sample(slot), self.rejected.sample(int(self.pair[slot])), label)

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
    pair, desirable = arrays[f"{role}_pair"], arrays.get(f"{role}_desirable")
    return [PreferencePair(chosen.sample(i), rejected.sample(int(pair[i])),
                           None if desirable is None else bool(desirable[i]))
            for i in range(len(chosen)) if pair[i] >= 0]


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

    train = PairRows(table("train"), table("train", "_rejected"), arrays["train_pair"], arrays["train_slots"],
                     arrays.get("train_desirable"))
    report = DataReport.from_dict(meta["report"])
    report.packing, report.num_rows, report.cache = False, len(train), cache_status  # packed per micro batch
    val_table, test_table = table("val"), table("test")
    data = Datasets(train, [val_table.sample(i) for i in whole("val")], samples("val"),
                    EncodeStats(**meta["train_stats"]), meta["num_train_records"],
                    [test_table.sample(i) for i in whole("test")], samples("test"), report,
                    fingerprint({"content": cache_key, "pairs": True}),
                    Origins(arrays["train_source"], arrays["train_file"], arrays["train_line"], meta["train_paths"]))
    data.val_pairs, data.test_pairs = split_pairs(arrays, "val"), split_pairs(arrays, "test")
    return data
