"""What the pipeline did to the data, counted per source, and the table `trainer data check` prints.

The report is plain data (JSON-able), so it is stored with the tokenised cache and a cache hit reports
the same numbers as the run that built it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Sequence

from trainer.data.formats import FLAG_REASONS, INTENDED_SKIPS, SKIP_REASONS

TRAINED_OPEN, TRAINED_CLOSE = "[[", "]]"


@dataclass
class SourceReport:
    path: str
    role: str  # train | replay | val | test
    format: str
    weight: float = 1.0
    records: int = 0  # records read (after the source's max_samples cap)
    skipped: dict = field(default_factory=dict)  # reason (formats.SKIP_REASONS) -> count
    flagged: dict = field(default_factory=dict)  # kept, but worth a look: reason (formats.FLAG_REASONS) -> count
    duplicates_exact: int = 0  # repeats of an earlier record, found whether or not data.dedup removes them
    duplicates_normalized: int = 0  # repeats once case, punctuation and spacing are ignored (and not exact)
    duplicates_removed: int = 0
    to_val: int = 0  # records held out by data.val_ratio / data.test_ratio
    to_test: int = 0
    truncated: int = 0
    chunked: int = 0  # long text documents split into max_seq_len windows (data.text_chunking)
    windows: int = 0  # the windows they became
    dropped_too_long: int = 0
    dropped_no_labels: int = 0  # nothing left to train on after truncation
    samples: int = 0  # samples kept after tokenising
    uses: int = 0  # samples per epoch after the mixing weight
    tokens: int = 0  # tokens per epoch (after the weight)
    trained_tokens: int = 0

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())


TRUNCATION_WARNING_SHARE = 0.05  # more than this share of records cut short is worth a warning


@dataclass
class DataReport:
    sources: list[SourceReport]
    template: str
    max_seq_len: int
    truncation: str
    dedup: str
    num_train_samples: int = 0  # samples per epoch, after weights
    num_val: int = 0
    num_test: int = 0
    val_overlap: int = 0  # validation/test records identical to a training record (leakage)
    overlap_removed: int = 0
    length_percentiles: dict = field(default_factory=dict)  # p50, p90, p99, max, mean of training samples
    # Filled in after loading: these depend on packing or on the cache, not on the tokenised content.
    packing: bool = False
    num_rows: int = 0
    packing_efficiency: float = 0.0
    cache: str = "off"
    pairs: bool = False  # preference pairs for a preference objective (trainer/data/pairs.py)
    pairs_dropped: int = 0  # pairs whose rejected side was dropped (too long, nothing to train on)
    # KTO (unpaired): training answers labelled desirable / undesirable; pairs_dropped then counts answers whose
    # mismatched side (the KL estimate's) was dropped
    desirable: int = 0
    undesirable: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DataReport":
        data = dict(data)
        data["sources"] = [SourceReport(**s) for s in data["sources"]]
        return cls(**data)

    def summary_line(self) -> str:
        """One line for the training log."""
        held = f"{self.num_val:,} validation" + (f", {self.num_test:,} test" if self.num_test else "")
        line = (f"data: {self.num_train_samples:,} training samples ({held}) in {self.num_rows:,} rows of <= "
                f"{self.max_seq_len} tokens")
        if self.packing:
            line += f"; packing efficiency {100 * self.packing_efficiency:.1f}%"
        replayed = sum(s.uses for s in self.sources if s.role == "replay")
        if replayed:
            line += f"; {replayed:,} of the samples ({100 * replayed / max(self.num_train_samples, 1):.1f}%) replayed"
        if self.pairs and (self.desirable or self.undesirable):
            line = line.replace("training samples", f"KTO answers ({self.desirable:,} desirable, "
                                f"{self.undesirable:,} undesirable)", 1)
            line += (f"; {self.pairs_dropped:,} answers dropped (mismatched side)" if self.pairs_dropped else "")
        elif self.pairs:
            line = line.replace("training samples", "preference pairs", 1)
            line += f"; {self.pairs_dropped:,} pairs dropped (rejected side)" if self.pairs_dropped else ""
        return line + f"; template {self.template}; cache {self.cache}"

    def warnings(self) -> list[str]:
        """What a user should not miss before a run trains on this data (the training log shows these too)."""
        warnings = []
        for s in self.sources:
            if s.role != "train":
                continue
            cut = s.truncated + s.dropped_too_long + s.dropped_no_labels
            tokenised = s.samples + s.dropped_too_long + s.dropped_no_labels
            if tokenised and cut / tokenised > TRUNCATION_WARNING_SHARE:
                warnings.append(f"warning: {100 * cut / tokenised:.0f}% of the training records of {_short(s.path)} "
                                f"were truncated or dropped at max_seq_len={self.max_seq_len}: raise "
                                "data.max_seq_len, or set data.truncation=drop to leave them out whole")
            if s.format == "preference" and s.samples and not self.pairs:
                warnings.append(f"warning: {_short(s.path)} holds preference pairs, and supervised fine-tuning trains "
                                f"on the prompt and the chosen answer only: its {s.samples:,} rejected answers are "
                                "unused")
            if s.skipped.get("undesirable"):
                warnings.append(f"warning: {_short(s.path)}: {s.skipped['undesirable']:,} answers labelled undesirable "
                                "(KTO label false) are left out: supervised fine-tuning trains only on the desirable "
                                "ones")
        return warnings


def length_percentiles(lengths: Sequence[int]) -> dict:
    import numpy as np

    if not len(lengths):
        return {}
    values = np.asarray(lengths)
    return {"p50": int(np.percentile(values, 50)), "p90": int(np.percentile(values, 90)),
            "p99": int(np.percentile(values, 99)), "max": int(values.max()), "mean": float(values.mean())}


# ------------------------------------------------------------------------------------------ the table
def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = []
    for row in [header, *rows]:
        cells = [str(cell).ljust(w) if i == 0 else str(cell).rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        lines.append("  ".join(cells).rstrip())
    return lines


def _short(path: str, width: int = 48) -> str:
    return path if len(path) <= width else "..." + path[-(width - 3):]


def format_report(report: DataReport, padding_efficiency: float | None = None, micro_batch_size: int = 0) -> str:
    lines = [f"data check: {len(report.sources)} source(s); template {report.template}; max_seq_len "
             f"{report.max_seq_len} ({report.truncation}); dedup {report.dedup}; cache {report.cache}", ""]
    header = ["source", "role", "format", "records", "skipped", "duplicates", "deduped", "held-out", "truncated",
              "dropped", "kept", "weight", "uses"]
    rows = []
    for s in report.sources:
        rows.append([_short(s.path), s.role, s.format, f"{s.records:,}", f"{s.num_skipped:,}",
                     f"{s.duplicates_exact + s.duplicates_normalized:,}", f"{s.duplicates_removed:,}",
                     f"{s.to_val + s.to_test:,}", f"{s.truncated:,}", f"{s.dropped_too_long + s.dropped_no_labels:,}",
                     f"{s.samples:,}", f"{s.weight:.3g}" if s.role in ("train", "replay") else "-",
                     f"{s.uses:,}" if s.role in ("train", "replay") else "-"])
    lines += _table(header, rows)
    notes = _source_notes(report)
    if notes:
        lines += [""] + notes
    lines.append("")
    lines.append(f"splits: train {report.num_train_samples:,} samples per epoch, validation {report.num_val:,}, "
                 f"test {report.num_test:,}")
    lines += report.warnings()
    if report.val_overlap:
        action = "removed" if report.overlap_removed else "kept: set data.dedup=exact to remove them"
        lines.append(f"warning: {report.val_overlap:,} validation/test records also appear in training ({action})")
    p = report.length_percentiles
    if p:
        tokens = sum(s.tokens for s in report.sources)
        trained = sum(s.trained_tokens for s in report.sources)
        share = 100 * trained / max(tokens, 1)
        lines.append(f"training tokens per epoch: {tokens:,} ({trained:,} trained, {share:.0f}%)")
        lines.append(f"sample length (tokens): p50 {p['p50']}  p90 {p['p90']}  p99 {p['p99']}  max {p['max']}  "
                     f"mean {p['mean']:.1f}")
    if report.packing:
        lines.append(f"packing: {report.num_train_samples:,} samples -> {report.num_rows:,} rows of "
                     f"{report.max_seq_len}; efficiency {100 * report.packing_efficiency:.1f}% (real tokens / slots)")
    else:
        lines.append(f"packing: off ({report.num_rows:,} rows, one sample each)")
    if padding_efficiency is not None:
        lines.append(f"unpacked micro batches of {micro_batch_size}, padded to their longest sample: "
                     f"{100 * padding_efficiency:.1f}% of slots are real tokens")
    return "\n".join(lines)


def _source_notes(report: DataReport) -> list[str]:
    notes = []
    for s in report.sources:
        for reason, count in sorted(s.skipped.items()):
            if count:
                strict = "" if reason in INTENDED_SKIPS else " (data.strict=true makes this an error)"
                notes.append(f"  {_short(s.path)}: {count:,} skipped: {SKIP_REASONS[reason]}{strict}")
        for reason, count in sorted(s.flagged.items()):
            if count:
                notes.append(f"  {_short(s.path)}: {count:,} kept with {FLAG_REASONS[reason]} (data.strict=true "
                             "refuses them)")
        if s.chunked:
            notes.append(f"  {_short(s.path)}: {s.chunked:,} documents longer than max_seq_len split into "
                         f"{s.windows:,} windows (data.text_chunking=false truncates them instead)")
        if s.duplicates_exact or s.duplicates_normalized:
            notes.append(f"  {_short(s.path)}: {s.duplicates_exact:,} exact and {s.duplicates_normalized:,} more "
                         f"normalised-text duplicates; {s.duplicates_removed:,} removed (data.dedup={report.dedup})")
        if s.dropped_too_long:
            notes.append(f"  {_short(s.path)}: {s.dropped_too_long:,} longer than max_seq_len dropped "
                         "(truncation=drop)")
        if s.dropped_no_labels:
            notes.append(f"  {_short(s.path)}: {s.dropped_no_labels:,} dropped: the prompt fills max_seq_len, "
                         "nothing left to train on")
    return notes


def render_trained_tokens(input_ids: Sequence[int], labels: Sequence[int], tokenizer, ignore_index: int = -100) -> str:
    """The sample's text with the tokens that carry loss between [[ and ]] (special tokens shown as they are)."""
    pieces: list[str] = []
    run: list[int] = []
    run_trained = False
    for token, label in zip(list(input_ids), list(labels)):
        trained = int(label) != ignore_index
        if run and trained != run_trained:
            pieces.append(_decorate(tokenizer.decode(run, skip_special_tokens=False), run_trained))
            run = []
        run.append(int(token))
        run_trained = trained
    if run:
        pieces.append(_decorate(tokenizer.decode(run, skip_special_tokens=False), run_trained))
    return "".join(pieces)


def _decorate(text: str, trained: bool) -> str:
    return f"{TRAINED_OPEN}{text}{TRAINED_CLOSE}" if trained else text
