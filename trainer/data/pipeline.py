"""The data pipeline, stage by stage: read and parse -> de-duplicate -> split -> render -> tokenise -> weight
-> (cache) -> pack.

Parsing needs no tokenizer, so `trainer data check` reports a bad record before loading one. Everything
from rendering on is stored in the tokenised cache; packing is redone on load (it is fast, and it depends
on the packing setting, which the cache key leaves out).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from trainer.config.schema import DataConfig
from trainer.data.encode import EncodedSample, EncodeStats, TokenTable, encode_samples
from trainer.data.formats import (
    FLAG_REASONS,
    INTENDED_SKIPS,
    PARSERS,
    SKIP_REASONS,
    Example,
    Sample,
    Skip,
    columns_for,
    detect_format,
    turn_order_problem,
)
from trainer.data.hygiene import apply_weight, exact_key, find_duplicates, split_indices
from trainer.data.packing import TrainRows
from trainer.data.report import DataReport, SourceReport, length_percentiles
from trainer.data.sources import Source, configured_sources, iter_records
from trainer.data.templates import build_template, render_example
from trainer.errors import DataError

_SKIP_EXPECTED = {
    "empty": "a non-blank answer",
    "ends_on_user": "the last message to be the assistant's",
    "identical_pair": "two different answers",
    "empty_turn": "every assistant turn to have an answer",
    "turn_order": "user and assistant turns taking turns, starting with the user",
}


@dataclass
class Parsed:
    """Every source's examples, before any tokenizer is involved."""

    sources: list[Source]
    formats: list[str]  # per source, after `auto` detection
    examples: list[list[Example]]
    reports: list[SourceReport]


@dataclass
class Origins:
    """Where each training sample (row of the token table) came from: source index, file and line."""

    sources: object  # np.ndarray of source indices
    files: object  # np.ndarray of indices into `paths`
    lines: object  # np.ndarray of 1-based lines (rows for Parquet and datasets)
    paths: list[str]

    def where(self, index: int) -> str:
        return f"{self.paths[int(self.files[index])]}:{int(self.lines[index])}"


@dataclass
class Datasets:
    train: TrainRows  # rows for the sampler: packed rows, or one sample per row
    val: list[EncodedSample]
    val_samples: list[Sample]  # the untokenised validation samples, for generation metrics
    train_stats: EncodeStats
    num_train_records: int  # training records after de-duplication and the split (before weights)
    test: list[EncodedSample] = field(default_factory=list)
    test_samples: list[Sample] = field(default_factory=list)
    report: DataReport | None = None
    fingerprint: str = ""  # identifies the training rows (for resuming)
    train_origin: Origins | None = None
    val_pairs: list = field(default_factory=list)  # preference objectives: whole pairs (trainer/data/pairs.py)
    test_pairs: list = field(default_factory=list)


# ------------------------------------------------------------------------------------------- parsing
def decide_formats(cfg: DataConfig) -> list[str]:
    """`data.format=auto` decided from each training source's first record and written into CFG (with the column
    names the detection read, e.g. Dolly's), so the frozen config says what the run trains on, and `trainer
    generate` and exports see the real format. Returns a note per decision."""
    notes = []
    sources = configured_sources(cfg)
    specs = cfg.sources or [cfg]
    for spec, source in zip(specs, sources):
        if source.format != "auto":
            continue
        first = next(iter(iter_records(source, cfg.text_unit)), None)
        if first is None:
            continue  # an empty source: parsing names it
        fmt, column_map = detect_format(first, source.column_map)
        spec.format = fmt
        for key, value in column_map.items():
            if getattr(spec.columns, key, None) is None and value != columns_for(fmt, {})[key]:
                setattr(spec.columns, key, value)
        mapped = {k: v for k, v in column_map.items() if v != columns_for(fmt, {})[k]}
        shown = f" (columns {', '.join(f'{k}={v}' for k, v in sorted(mapped.items()))})" if mapped else ""
        notes.append(f"data{'' if spec is cfg else f'.sources.{source.index}'}.format={fmt}{shown} (detected "
                     f"from {first.path}:{first.line})")
    return notes


def parse_sources(cfg: DataConfig, keep_undesirable: bool = False) -> Parsed:
    """Read and parse every source; a bad record raises DataError naming its file and line. Answers labelled
    undesirable (KTO data) are skipped and counted unless `keep_undesirable` (the KTO objective trains on them)."""
    sources = configured_sources(cfg)
    formats, examples, reports = [], [], []
    for source in sources:
        report = SourceReport(source.path, source.role, source.format, source.weight)
        fmt, parser, columns, parsed = source.format, None, {}, []
        skipped: Counter = Counter()
        flagged: Counter = Counter()
        for record in iter_records(source, cfg.text_unit):
            if parser is None:
                column_map = source.column_map
                if fmt == "auto":
                    fmt, column_map = detect_format(record, column_map)
                parser, columns = PARSERS[fmt], columns_for(fmt, column_map)
            report.records += 1
            try:
                example = parser(record, columns, source.index)
            except Skip as skip:
                if cfg.strict and skip.reason not in INTENDED_SKIPS:
                    raise DataError(record.path, record.line, f"{SKIP_REASONS[skip.reason]} (expected "
                                    f"{_SKIP_EXPECTED[skip.reason]}; data.strict=false skips and counts such "
                                    "records)") from None
                skipped[skip.reason] += 1
                continue
            if example.desirable is False and not keep_undesirable:
                skipped["undesirable"] += 1  # supervised fine-tuning must never learn an undesirable answer
                continue
            if example.flags and cfg.strict:
                flag = example.flags[0]
                what = (turn_order_problem(list(example.messages)) if flag == "turn_order"
                        else FLAG_REASONS[flag].split(":")[0])
                raise DataError(record.path, record.line, f"{what} (expected {_SKIP_EXPECTED[flag]}; "
                                "data.strict=false keeps and counts such records)")
            flagged.update(example.flags)
            parsed.append(example)
        if not report.records:
            raise DataError(source.path, 1, "the source holds no records (expected at least one)")
        report.format, report.skipped, report.flagged = fmt, dict(skipped), dict(flagged)
        formats.append(fmt)
        examples.append(parsed)
        reports.append(report)
    return Parsed(sources, formats, examples, reports)


# ------------------------------------------------------------------------------------ building content
def _hold_out(parsed: Parsed, cfg: DataConfig, seed: int):
    """De-duplicate the training sources, then split each; explicit val/test files replace the ratio split."""
    train_ids = [s.index for s in parsed.sources if s.role == "train"]
    pool = [example for i in train_ids for example in parsed.examples[i]]
    duplicates = find_duplicates(pool, cfg.dedup)
    train: list[Example] = []
    held = {"val": [], "test": []}
    cursor = 0
    explicit = {s.role: s.index for s in parsed.sources if s.role in ("val", "test")}
    for i in train_ids:
        report, count = parsed.reports[i], len(parsed.examples[i])
        span = range(cursor, cursor + count)
        report.duplicates_exact = duplicates.count("exact", span)
        report.duplicates_normalized = duplicates.count("normalized", span)
        report.duplicates_removed = sum(duplicates.removed[j] for j in span)
        kept = [pool[j] for j in span if not duplicates.removed[j]]
        cursor += count
        val_ratio = 0.0 if "val" in explicit else cfg.val_ratio
        test_ratio = 0.0 if "test" in explicit else cfg.test_ratio
        part_train, part_val, part_test = split_indices(len(kept), val_ratio, test_ratio, seed, stream=i)
        train += [kept[j] for j in part_train]
        held["val"] += [kept[j] for j in part_val]
        held["test"] += [kept[j] for j in part_test]
        report.to_val, report.to_test = len(part_val), len(part_test)
    for role, index in explicit.items():
        held[role] = parsed.examples[index]
    for source in parsed.sources:  # replayed general data is only ever trained on: never split, never de-duplicated
        if source.role == "replay":
            train += parsed.examples[source.index]
    train_keys = {exact_key(example) for example in train}
    overlap = {role: [exact_key(e) in train_keys for e in examples] for role, examples in held.items()}
    num_overlap = sum(sum(flags) for flags in overlap.values())
    if cfg.dedup != "none":
        held = {role: [e for e, dup in zip(examples, overlap[role]) if not dup] for role, examples in held.items()}
    return train, held["val"], held["test"], num_overlap


def held_out_examples(cfg: DataConfig, seed: int, split: str) -> tuple[list[Example], list[str]]:
    """(the records of a run's `val` or `test` split, the sources' formats): the same records training held out, from
    the same files, de-duplication and seeded split (or its explicit val/test file)."""
    parsed = parse_sources(cfg)
    _, val, test, _ = _hold_out(parsed, cfg, seed)
    return (val if split == "val" else test), parsed.formats


def _encode_split(examples: list[Example], template, tokenizer, cfg: DataConfig):
    samples = [render_example(example, template, tokenizer.bos_token) for example in examples]
    table, kept, events, stats = encode_samples(samples, tokenizer, cfg.max_seq_len, cfg.train_on_inputs,
                                                cfg.truncation, chunk_text=cfg.text_chunking)
    return samples, table, kept, events, stats


def build_content(parsed: Parsed, cfg: DataConfig, tokenizer, seed: int, pairs: str = "") -> tuple[dict, dict]:
    """Everything the cache stores: arrays (tokens, offsets, which samples each epoch uses) and JSON meta.

    `pairs` (preference objectives, trainer.objectives.pair_mode): the chosen side (KTO: the answer) is encoded as
    below, and trainer/data/pairs.py adds each kept sample's rejected side (KTO: its mismatched answer)."""
    import numpy as np

    from trainer.objectives import PAIRED, UNPAIRED

    if pairs == PAIRED:
        from trainer.data.pairs import preference_examples

        parsed = preference_examples(parsed)
    elif pairs == UNPAIRED:
        from trainer.data.pairs import kto_examples

        parsed = kto_examples(parsed)

    template = build_template(cfg.template, tokenizer, parsed.formats)
    train, val, test, num_overlap = _hold_out(parsed, cfg, seed)
    if pairs == UNPAIRED:  # each answer's mismatched one comes from its own split: nothing held out leaks in
        from trainer.data.pairs import with_mismatched_answers

        train, val, test = (with_mismatched_answers(split, seed, stream) for stream, split in
                            enumerate((train, val, test)))
    _, table, kept, events, stats = _encode_split(train, template, tokenizer, cfg)
    kept_source = np.asarray([train[k].source for k in kept], dtype=np.int64)
    paths = sorted({train[k].path for k in kept})
    path_index = {path: i for i, path in enumerate(paths)}
    for reason, indices in events.items():
        for source, count in Counter(train[i].source for i in indices).items():
            report = parsed.reports[source]
            if reason == "truncated":
                report.truncated = count
            elif reason == "chunked":
                report.chunked = count
            elif reason == "windows":
                report.windows = count
            elif reason == "too_long":
                report.dropped_too_long = count
            else:
                report.dropped_no_labels = count
    slots: list[int] = []
    lengths, label_counts = table.lengths, table.label_counts
    # Training sources first: the replay source's share is of the epoch they make up with it.
    for source in sorted(parsed.sources, key=lambda s: s.role == "replay"):
        if source.role not in ("train", "replay"):
            continue
        mine = np.flatnonzero(kept_source == source.index).tolist()
        weight = source.weight
        if source.role == "replay" and mine:  # weight holds data.replay.ratio: r of the epoch, so r/(1-r) per sample
            weight = source.weight / (1 - source.weight) * len(slots) / len(mine)
            parsed.reports[source.index].weight = weight
        uses = apply_weight(mine, weight, seed, stream=source.index)
        slots += uses
        report = parsed.reports[source.index]
        report.samples, report.uses = len(mine), len(uses)
        report.tokens = int(lengths[uses].sum()) if uses else 0
        report.trained_tokens = int(label_counts[uses].sum()) if uses else 0
    arrays = {"train_ids": table.input_ids, "train_trained": table.trained, "train_offsets": table.offsets,
              "train_slots": np.asarray(slots, dtype=np.int64), "train_source": kept_source,
              "train_file": np.asarray([path_index[train[k].path] for k in kept], dtype=np.int64),
              "train_line": np.asarray([train[k].line for k in kept], dtype=np.int64)}
    meta: dict = {"train_stats": vars(stats), "num_train_records": len(train), "train_paths": paths}
    for role, examples in (("val", val), ("test", test)):
        samples, split_table, split_kept, split_events, _ = _encode_split(examples, template, tokenizer, cfg)
        index = next((s.index for s in parsed.sources if s.role == role), None)
        if index is not None:  # explicit files get their own line in the report
            report = parsed.reports[index]
            report.samples = report.uses = len(split_kept)
            report.truncated = len(split_events["truncated"])
            report.dropped_too_long = len(split_events["too_long"])
            report.dropped_no_labels = len(split_events["no_labels"])
        arrays.update({f"{role}_ids": split_table.input_ids, f"{role}_trained": split_table.trained,
                       f"{role}_offsets": split_table.offsets})
        meta[f"{role}_samples"] = [[samples[k].prompt, samples[k].reference, samples[k].source, samples[k].line]
                                   for k in split_kept]
        arrays[f"{role}_example"] = np.asarray(split_kept, dtype=np.int64)
    report = DataReport(parsed.reports, template.description if template else "none (text/completion data)",
                        cfg.max_seq_len, cfg.truncation, cfg.dedup, num_train_samples=len(slots),
                        num_val=len(meta["val_samples"]), num_test=len(meta["test_samples"]), val_overlap=num_overlap,
                        overlap_removed=num_overlap if cfg.dedup != "none" else 0,
                        length_percentiles=length_percentiles(lengths[slots] if slots else []))
    arrays["train_example"] = np.asarray(kept, dtype=np.int64)
    if pairs:
        from trainer.data.pairs import add_rejected_sides

        add_rejected_sides(arrays, meta, (train, val, test), template, tokenizer, cfg, report)
    meta["report"] = report.to_dict()
    return arrays, meta


# ------------------------------------------------------------------------------------------- loading
def datasets_from_content(arrays: dict, meta: dict, cfg: DataConfig, cache_key: str, cache_status: str,
                          pairs: str = "") -> Datasets:
    from trainer.data.cache import fingerprint

    if pairs:
        from trainer.data.pairs import pair_datasets

        return pair_datasets(arrays, meta, cfg, cache_key, cache_status)

    def table(role: str) -> TokenTable:
        return TokenTable(arrays[f"{role}_ids"], arrays[f"{role}_trained"], arrays[f"{role}_offsets"])

    def samples(role: str) -> list[Sample]:
        return [Sample((), source, line, prompt, reference)
                for prompt, reference, source, line in meta[f"{role}_samples"]]

    train = TrainRows(table("train"), arrays["train_slots"], cfg.max_seq_len, cfg.packing)
    val_table, test_table = table("val"), table("test")
    report = DataReport.from_dict(meta["report"])
    report.packing, report.num_rows, report.cache = cfg.packing, len(train), cache_status
    report.packing_efficiency = train.efficiency
    return Datasets(train, [val_table.sample(i) for i in range(len(val_table))], samples("val"),
                    EncodeStats(**meta["train_stats"]), meta["num_train_records"],
                    [test_table.sample(i) for i in range(len(test_table))], samples("test"), report,
                    fingerprint({"content": cache_key, "packing": cfg.packing}),
                    Origins(arrays["train_source"], arrays["train_file"], arrays["train_line"], meta["train_paths"]))


def prepare_datasets(cfg: DataConfig, tokenizer, seed: int, cache_dir: str | None = None,
                     parsed: Parsed | None = None, pairs: str = "") -> Datasets:
    """Tokenised, split and (optionally) packed data, from the cache when an entry for these inputs exists.
    `pairs` (trainer.objectives.pair_mode): preference pairs, or KTO's labelled answers, for a preference
    objective."""
    import time

    from trainer.data.cache import TokenCache, fingerprint, tokenizer_fingerprint
    from trainer.data.sources import source_fingerprint
    from trainer.objectives import PAIRED, UNPAIRED

    def build() -> tuple[dict, dict]:
        return build_content(parsed or parse_sources(cfg, keep_undesirable=pairs == UNPAIRED), cfg, tokenizer, seed,
                             pairs)

    sources = configured_sources(cfg)
    key = fingerprint({
        "sources": [{**vars(s), "data": source_fingerprint(s)} for s in sources],
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "options": {name: getattr(cfg, name) for name in ("template", "max_seq_len", "truncation", "train_on_inputs",
                                                          "dedup", "strict", "text_unit", "text_chunking", "val_ratio",
                                                          "test_ratio")},
        "seed": seed,
        # SFT keys stay what they were, so existing caches still hit (and pair caches, from before KTO)
        **({"pairs": True if pairs == PAIRED else pairs} if pairs else {}),
    })
    started = time.monotonic()
    if cfg.cache and cache_dir:
        cache = TokenCache(cache_dir, key)
        arrays, meta, built = cache.get_or_build(build)
        status = f"built {cache.path} ({time.monotonic() - started:.1f} s)" if built else f"hit {cache.path}"
    else:
        arrays, meta = build()
        status = "off"
    return datasets_from_content(arrays, meta, cfg, key, status, pairs)


def build_datasets(cfg: DataConfig, tokenizer, seed: int, cache_dir: str | None = None,
                   pairs: str = "") -> Datasets:
    """What training needs; raises DataError when nothing usable is left to train on."""
    data = prepare_datasets(cfg, tokenizer, seed, cache_dir, pairs=pairs)
    if not len(data.train):
        where = cfg.path or (cfg.sources[0].path if cfg.sources else "data")
        raise DataError(where, None, "no usable training records after formatting and truncation (expected at "
                        "least one record with something to train on; run `trainer data check` for the counts)")
    return data
