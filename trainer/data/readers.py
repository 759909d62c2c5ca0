"""Read the records of one local file, keeping each record's 1-based line so that errors can point at it.

JSON (an array, an object holding one list, or JSON Lines saved as .json), JSONL, CSV/TSV and plain text
are parsed here without pandas or `datasets`: those lose line numbers, and a user's first contact with a
framework is usually a data file with one bad line. Parquet rows are numbered from 1 instead of lines.
A UTF-8 BOM, CRLF line ends and blank lines are accepted everywhere.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from trainer.errors import DataError


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from (`line` is the row number for Parquet and datasets)."""

    data: Any
    path: str
    line: int


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline=None) as fh:  # utf-8-sig drops a BOM; newline=None folds CRLF
            return fh.read()
    except UnicodeDecodeError as err:
        text = open(path, "rb").read()
        line = text.count(b"\n", 0, err.start) + 1
        raise DataError(path, line, f"not UTF-8 text ({err.reason} at byte {err.start}) (expected UTF-8: re-save "
                        "the file as UTF-8)") from None
    except OSError as err:
        raise DataError(path, None, f"cannot read: {err.strerror}") from None


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _empty_file(path: str, expected: str) -> DataError:
    return DataError(path, 1, f"the file is empty (expected {expected})")


def _where(err: json.JSONDecodeError) -> str:
    """`Expecting value at column 7`; the decoder's "Unterminated string starting at" already ends in "at"."""
    return f"{err.msg} column {err.colno}" if err.msg.endswith(" at") else f"{err.msg} at column {err.colno}"


def describe_json_error(text: str, err: json.JSONDecodeError, expected: str) -> str:
    """Word a decoder error for people: name trailing commas and cut-off text, which the raw messages hide."""
    before = text[:err.pos].rstrip()
    after = text[err.pos:err.pos + 1]
    if before.endswith(",") and after in ("}", "]"):
        return f"trailing comma before {after!r} (expected another value after ',', or no comma)"
    if err.msg == "Extra data" and text[err.pos:].strip() == ",":
        return "a comma after the record (expected one JSON object per line, with no commas between lines)"
    if err.pos >= len(text.rstrip()) or err.msg.startswith("Unterminated string"):
        return f"the text ends in the middle of a value: {_where(err)} (expected {expected}; is the file truncated?)"
    return f"malformed JSON: {_where(err)} (expected {expected})"


def _iter_json_array(path: str, text: str, start: int) -> Iterator[Record]:
    """Decode `[rec, rec, ...]` element by element so each record keeps its own line."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        return
    expected = "a JSON value for each record"
    while True:
        if pos >= len(text):
            raise DataError(path, _line_of(text, len(text)), "the JSON array is not closed (expected ']' at the end; "
                            "is the file truncated?)")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise DataError(path, _line_of(text, err.pos), describe_json_error(text, err, expected)) from None
        yield Record(value, path, _line_of(text, pos))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            after = _skip_space(text, pos + 1)
            if after < len(text) and text[after] == "]":
                raise DataError(path, _line_of(text, pos), "trailing comma after the last record (expected ']' right "
                                "after the last record: remove the comma)")
            pos = after
            continue
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text):
            raise DataError(path, _line_of(text, len(text)), "the JSON array is not closed (expected ']' at the end; "
                            "is the file truncated?)")
        raise DataError(path, _line_of(text, pos), f"found {text[pos]!r} after a record (expected ',' or ']')")


def _iter_json_lines(path: str, text: str) -> Iterator[Record]:
    lines = text.split("\n")
    last_content = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if index == last_content and not text.endswith("\n"):
                message = (f"the last line is cut off: {_where(err)} (expected a complete JSON object; is the file "
                           "truncated?)")
            else:
                message = describe_json_error(line, err, "one JSON object per line")
            raise DataError(path, index + 1, message) from None
        yield Record(value, path, index + 1)


def read_jsonl(path: str, **_: Any) -> Iterator[Record]:
    """One JSON object per line; blank lines are skipped; a truncated last line is named as such."""
    text = read_text_file(path)
    if not text.strip():
        raise _empty_file(path, "one JSON object per line")
    yield from _iter_json_lines(path, text)


# List-valued fields of a record in the formats we read: an object whose one list is one of these is a single record
# (`{"messages": [...]}`), not a wrapper holding the records (`{"data": [...]}`).
RECORD_LIST_FIELDS = ("messages", "conversations", "chosen", "rejected", "prompt", "completion", "tools")


def read_json(path: str, **_: Any) -> Iterator[Record]:
    """A JSON array of records, an object holding exactly one list of records, a single record object, or JSON
    Lines named .json."""
    text = read_text_file(path)
    start = _skip_space(text, 0)
    if start >= len(text):
        raise _empty_file(path, "a JSON array of records")
    if text[start] == "[":
        yield from _iter_json_array(path, text, start)
        return
    if text[start] != "{":
        raise DataError(path, _line_of(text, start), f"found {text[start]!r} (expected a JSON array of records, or "
                        "an object holding one)")
    try:
        first, end = json.JSONDecoder().raw_decode(text, start)
    except json.JSONDecodeError as err:
        raise DataError(path, _line_of(text, err.pos), describe_json_error(text, err, "a JSON object")) from None
    if _skip_space(text, end) < len(text):  # more objects follow: JSON Lines saved with a .json name
        yield from _iter_json_lines(path, text)
        return
    lists = [key for key, value in first.items() if isinstance(value, list)]
    if len(lists) != 1 or lists[0] in RECORD_LIST_FIELDS:  # one record: its lists are its own fields
        yield Record(first, path, _line_of(text, start))
        return
    key_pos = text.find(json.dumps(lists[0]), start)
    yield from _iter_json_array(path, text, text.find("[", key_pos if key_pos >= 0 else start))


def read_plain_text(path: str, text_unit: str = "block", **_: Any) -> Iterator[Record]:
    """Plain text as `{"text": ...}` records: one per blank-line-separated block, per line, or per file."""
    text = read_text_file(path)
    if not text.strip():
        raise _empty_file(path, "text")
    if text_unit == "file":
        yield Record({"text": text.strip("\n")}, path, 1)
        return
    block: list[str] = []
    block_line = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            if text_unit == "line":
                yield Record({"text": line}, path, number)
                continue
            if not block:
                block_line = number
            block.append(line)
        elif block:
            yield Record({"text": "\n".join(block)}, path, block_line)
            block = []
    if block:
        yield Record({"text": "\n".join(block)}, path, block_line)


def read_csv(path: str, delimiter: str = ",", **_: Any) -> Iterator[Record]:
    """CSV/TSV with a header row; every cell is text. A record's line is the line its row starts on."""
    import csv
    import io

    text = read_text_file(path)
    if not text.strip():
        raise _empty_file(path, "a header row, then one record per row")
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, strict=True)
    kind = "tab" if delimiter == "\t" else "comma"
    try:
        header = next(reader)
        start = reader.line_num + 1
        for row in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise DataError(path, line, f"the row has {len(row)} fields but the header has {len(header)} "
                                f"(expected {len(header)} {kind}-separated fields; quote fields that contain the "
                                "separator)")
            yield Record(dict(zip(header, row)), path, line)
    except csv.Error as err:
        raise DataError(path, reader.line_num, f"malformed CSV: {err} (expected {kind}-separated fields with "
                        "balanced quotes)") from None


def read_tsv(path: str, **kwargs: Any) -> Iterator[Record]:
    return read_csv(path, delimiter="\t")


def read_parquet(path: str, **_: Any) -> Iterator[Record]:
    """Parquet rows, numbered from 1, read in batches so a large file never sits in memory as Python objects."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as err:
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(path, None, f"not a readable Parquet file: {first} (expected Parquet)") from None
    if parquet.metadata.num_rows == 0:
        raise _empty_file(path, "at least one row")
    row = 0
    for batch in parquet.iter_batches(batch_size=4096):
        for value in batch.to_pylist():
            row += 1
            yield Record(value, path, row)


READERS: dict[str, Callable[..., Iterator[Record]]] = {
    ".json": read_json, ".jsonl": read_jsonl, ".ndjson": read_jsonl, ".txt": read_plain_text,
    ".md": read_plain_text, ".text": read_plain_text, ".csv": read_csv, ".tsv": read_tsv, ".parquet": read_parquet,
}
TEXT_EXTENSIONS = (".txt", ".md", ".text")


def reader_for(path: str) -> Callable[..., Iterator[Record]]:
    extension = os.path.splitext(path)[1].lower()
    reader = READERS.get(extension)
    if reader is None:
        raise DataError(path, None, f"unknown file type {extension or '(no extension)'!r} (expected one of "
                        f"{', '.join(READERS)})")
    return reader


def read_records(path: str, text_unit: str = "block") -> list[Record]:
    """All records of one file, chosen by its extension."""
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    return list(reader_for(path)(path, text_unit=text_unit))
