"""Read records from local files, keeping each record's 1-based line so errors can point at it.

JSON (an array, or an object holding one list), JSONL and plain text are read here without pandas or
`datasets`: those lose line numbers, and a user's first contact with a framework is usually a data file
with one bad line. A UTF-8 BOM, CRLF line ends and blank lines are accepted.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

from trainer.errors import DataError


@dataclass(frozen=True)
class Record:
    """One raw record and where it came from."""

    data: Any
    path: str
    line: int


def _read_text(path: str) -> str:
    try:
        with open(path, encoding="utf-8-sig", newline=None) as fh:  # utf-8-sig drops a BOM; newline=None folds CRLF
            return fh.read()
    except UnicodeDecodeError as err:
        raise DataError(path, None, f"not UTF-8 text ({err.reason} at byte {err.start}); re-save the file as UTF-8")
    except OSError as err:
        raise DataError(path, None, f"cannot read: {err.strerror}")


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


def _json_error(path: str, text: str, err: json.JSONDecodeError, what: str) -> DataError:
    return DataError(path, _line_of(text, err.pos), f"malformed JSON {what}: {err.msg} (column {err.colno})")


def iter_json_array(path: str, text: str, start: int) -> Iterator[Record]:
    """Decode `[rec, rec, ...]` element by element so each record keeps its own line."""
    decoder = json.JSONDecoder()
    pos = _skip_space(text, start + 1)
    if pos < len(text) and text[pos] == "]":
        return
    while True:
        if pos >= len(text):
            raise DataError(path, _line_of(text, len(text)), "the JSON array is not closed: the file looks truncated")
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError as err:
            raise _json_error(path, text, err, "record") from None
        yield Record(value, path, _line_of(text, pos))
        pos = _skip_space(text, end)
        if pos < len(text) and text[pos] == ",":
            after = _skip_space(text, pos + 1)
            if after < len(text) and text[after] == "]":
                raise DataError(path, _line_of(text, pos), "trailing comma after the last record: remove it")
            pos = after
            continue
        if pos < len(text) and text[pos] == "]":
            return
        if pos >= len(text):
            raise DataError(path, _line_of(text, len(text)), "the JSON array is not closed: the file looks truncated")
        raise DataError(path, _line_of(text, pos), f"expected ',' or ']' between records, found {text[pos]!r}")


def read_json(path: str) -> Iterator[Record]:
    """A JSON array of records, or an object holding exactly one list of records (e.g. {"data": [...]})."""
    text = _read_text(path)
    start = _skip_space(text, 0)
    if start >= len(text):
        raise DataError(path, None, "the file is empty: expected a JSON array of records")
    if text[start] == "[":
        yield from iter_json_array(path, text, start)
        return
    if text[start] != "{":
        raise DataError(path, _line_of(text, start), "expected a JSON array of records or an object holding one")
    try:
        whole = json.loads(text)
    except json.JSONDecodeError as err:
        raise _json_error(path, text, err, "document") from None
    lists = [key for key, value in whole.items() if isinstance(value, list)]
    if len(lists) != 1:
        # One top-level object may also be JSONL with a single line; treat it as one record.
        if "\n" not in text.strip():
            yield Record(whole, path, _line_of(text, start))
            return
        raise DataError(path, 1, f"a JSON object must hold exactly one list of records, found {len(lists)} lists")
    key_pos = text.find(json.dumps(lists[0]))
    list_start = text.find("[", key_pos if key_pos >= 0 else start)
    yield from iter_json_array(path, text, list_start)


def read_jsonl(path: str) -> Iterator[Record]:
    """One JSON object per line; blank lines are skipped; a truncated last line is reported as such."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, None, "the file is empty: expected one JSON record per line")
    lines = text.split("\n")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            last = number == len(lines) or all(not rest.strip() for rest in lines[number:])
            hint = " (the last line looks truncated)" if last and not text.endswith("\n") else ""
            raise DataError(path, number, f"malformed JSON line: {err.msg} (column {err.colno}){hint}") from None
        yield Record(value, path, number)


def read_text_blocks(path: str) -> Iterator[Record]:
    """Plain text: one document per blank-line-separated block, each record `{"text": ...}`."""
    text = _read_text(path)
    if not text.strip():
        raise DataError(path, None, "the file is empty: expected text")
    block: list[str] = []
    block_line = 0
    for number, line in enumerate(text.split("\n"), start=1):
        if line.strip():
            if not block:
                block_line = number
            block.append(line)
        elif block:
            yield Record({"text": "\n".join(block)}, path, block_line)
            block = []
    if block:
        yield Record({"text": "\n".join(block)}, path, block_line)


READERS = {".json": read_json, ".jsonl": read_jsonl, ".txt": read_text_blocks, ".md": read_text_blocks}


def read_records(path: str) -> list[Record]:
    """All records of one file, chosen by extension (.json, .jsonl, .txt/.md)."""
    if not os.path.isfile(path):
        raise DataError(path, None, "no such file")
    extension = os.path.splitext(path)[1].lower()
    reader = READERS.get(extension)
    if reader is None:
        raise DataError(path, None, f"unknown file type {extension!r}: use .json, .jsonl or .txt")
    return list(reader(path))
