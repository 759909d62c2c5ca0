"""Where records come from: files, globs, directories, `datasets` saved to disk, and hub dataset ids.

`data.path` + `data.format` is shorthand for one source; `data.sources` lists several, each with its own
format, weight, cap and column mapping. `data.val_path` / `data.test_path` are sources too, read with the
top-level format. Records keep their file and line; rows of `datasets` are numbered from 1.
"""

from __future__ import annotations

import glob
import os
import re
from dataclasses import dataclass
from typing import Iterator

from trainer.config.schema import DataConfig
from trainer.data.readers import READERS, TEXT_EXTENSIONS, Record, reader_for
from trainer.errors import DataError

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_GLOB_CHARS = "*?["


@dataclass(frozen=True)
class Source:
    """One configured source, with its options already defaulted from the top level of `data`."""

    index: int
    role: str  # train | replay | val | test
    path: str  # as the user wrote it
    format: str
    weight: float
    max_samples: int
    split: str | None
    columns: tuple[tuple[str, str], ...]  # (field, record key) pairs that differ from the format's own names

    @property
    def column_map(self) -> dict[str, str]:
        return dict(self.columns)


def _columns(*layers) -> tuple[tuple[str, str], ...]:
    """Merge column mappings; later layers (a source's own) win over earlier ones (data.columns)."""
    merged: dict[str, str] = {}
    for layer in layers:
        if layer is None:
            continue
        items = layer.items() if isinstance(layer, dict) else vars(layer).items()
        merged.update({key: value for key, value in items if value})
    return tuple(sorted(merged.items()))


def configured_sources(cfg: DataConfig) -> list[Source]:
    """Training sources first (in order), then the replay source, then the explicit validation and test files."""
    sources: list[Source] = []
    if cfg.sources:
        for spec in cfg.sources:
            sources.append(Source(len(sources), "train", os.path.normpath(spec.path), spec.format or cfg.format,
                                  float(spec.weight), spec.max_samples or cfg.max_samples, spec.split,
                                  _columns(cfg.columns, spec.columns)))
    else:
        sources.append(Source(0, "train", os.path.normpath(cfg.path), cfg.format, 1.0, cfg.max_samples, None,
                              _columns(cfg.columns)))
    if cfg.replay.path:  # its weight is the ratio here; trainer/data/pipeline.py turns it into uses per epoch
        sources.append(Source(len(sources), "replay", os.path.normpath(cfg.replay.path), cfg.replay.format,
                              float(cfg.replay.ratio), 0, None, ()))
    for role, path in (("val", cfg.val_path), ("test", cfg.test_path)):
        if path:
            sources.append(Source(len(sources), role, os.path.normpath(path), cfg.format, 1.0, 0, None,
                                  _columns(cfg.columns)))
    return sources


# ------------------------------------------------------------------------------------------ resolution
def is_saved_dataset(path: str) -> bool:
    """A directory written by `datasets`' save_to_disk (a Dataset or a DatasetDict)."""
    return os.path.isfile(os.path.join(path, "dataset_dict.json")) or (
        os.path.isfile(os.path.join(path, "dataset_info.json")) and os.path.isfile(os.path.join(path, "state.json")))


def looks_like_hub_id(path: str) -> bool:
    """`org/name` (or `name`) that is not a local path and has no file extension we read."""
    if os.path.exists(path) or os.path.isabs(path) or path.startswith("."):
        return False
    return bool(_HUB_ID.match(path)) and os.path.splitext(path)[1].lower() not in READERS


def _data_files_under(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, name) for name in sorted(files)
                     if not name.startswith(".") and os.path.splitext(name)[1].lower() in READERS)
    return found


def resolve(path: str) -> tuple[str, list[str]]:
    """("files", [file, ...]) for files, globs and plain directories; ("disk", [dir]); or ("hub", [id])."""
    if any(ch in path for ch in _GLOB_CHARS):
        matches = sorted(p for p in glob.glob(path, recursive=True) if os.path.isfile(p))
        files = [p for p in matches if os.path.splitext(p)[1].lower() in READERS]
        if not files:
            raise DataError(path, None, f"the pattern matches no data files (expected files ending in "
                            f"{', '.join(READERS)}; {len(matches)} other files matched)")
        return "files", files
    if os.path.isdir(path):
        if is_saved_dataset(path):
            return "disk", [path]
        files = _data_files_under(path)
        if not files:
            raise DataError(path, None, f"the directory holds no data files (expected files ending in "
                            f"{', '.join(READERS)}, or a dataset saved with datasets' save_to_disk)")
        return "files", files
    if os.path.isfile(path):
        return "files", [path]
    if looks_like_hub_id(path):
        return "hub", [path]
    raise DataError(path, None, "no such file or directory (expected a data file, directory, glob pattern, or a "
                    "hub dataset id)")


def _file_format_check(path: str, fmt: str) -> None:
    if os.path.splitext(path)[1].lower() in TEXT_EXTENSIONS and fmt not in ("text", "auto"):
        raise DataError(path, None, f"a plain-text file cannot hold {fmt} records (expected format text for this "
                        "source, or a JSON/JSONL/CSV/Parquet file)")


def _load_datasets_split(kind: str, path: str, split: str | None):
    """A `datasets.Dataset`: one split of a saved DatasetDict or a hub dataset."""
    try:
        import datasets
    except ImportError:
        raise DataError(path, None, "reading saved or hub datasets needs the `datasets` package (pip install "
                        "datasets)") from None
    try:
        if kind == "disk":
            loaded = datasets.load_from_disk(path)
            if isinstance(loaded, datasets.DatasetDict):
                name = split or "train"
                if name not in loaded:
                    raise DataError(path, None, f"the saved dataset has no split {name!r} (expected one of "
                                    f"{', '.join(loaded)}; set the source's split)")
                return loaded[name]
            return loaded
        return datasets.load_dataset(path, split=split or "train")
    except DataError:
        raise
    except Exception as err:  # datasets raises many types (connection, file-not-found, value) for one cause
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if kind == "disk":
            raise DataError(path, None, f"cannot load the saved dataset: {first} (expected a directory written by "
                            "datasets' save_to_disk)") from None
        raise DataError(path, None, f"no such local path, and loading it as a hub dataset failed: {first} (expected "
                        "a local file, directory or glob, or a hub dataset id with the hub reachable)") from None


def iter_records(source: Source, text_unit: str = "block") -> Iterator[Record]:
    """The source's records in order, stopping after `max_samples` (0: all)."""
    kind, targets = resolve(source.path)
    count = 0
    for record in _iter_all(kind, targets, source, text_unit):
        yield record
        count += 1
        if source.max_samples and count >= source.max_samples:
            return


def _iter_all(kind: str, targets: list[str], source: Source, text_unit: str) -> Iterator[Record]:
    if kind == "files":
        for path in targets:
            _file_format_check(path, source.format)
            yield from reader_for(path)(path, text_unit=text_unit)
        return
    dataset = _load_datasets_split(kind, targets[0], source.split)
    label = f"{targets[0]}[{source.split or 'train'}]" if kind == "hub" or source.split else targets[0]
    if len(dataset) == 0:
        raise DataError(label, 1, "the dataset is empty (expected at least one row)")
    for row, value in enumerate(dataset, start=1):
        yield Record(value, label, row)


def source_fingerprint(source: Source) -> dict:
    """What the cache key needs to know about a source's data: file names, sizes and modification times."""
    kind, targets = resolve(source.path)
    if kind == "hub":
        dataset = _load_datasets_split(kind, targets[0], source.split)
        return {"hub": targets[0], "split": source.split, "fingerprint": getattr(dataset, "_fingerprint", None)}
    files = targets if kind == "files" else sorted(
        os.path.join(root, name) for root, _, names in os.walk(targets[0]) for name in names)
    stats = []
    for path in files:
        info = os.stat(path)
        stats.append([os.path.abspath(path), info.st_size, info.st_mtime_ns])
    return {"kind": kind, "split": source.split, "files": stats}
