"""Turn raw records into `Sample`s: ordered text segments, each marked trainable or not.

A format knows which fields a record must have and which parts the loss is computed on; it knows
nothing about tokenizers. Errors name the record's file and line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from trainer.data.sources import Record
from trainer.data.templates import Template
from trainer.errors import DataError


@dataclass(frozen=True)
class Sample:
    """Text segments in order; `trainable` segments carry the loss unless train_on_inputs is set."""

    segments: tuple[tuple[str, bool], ...]
    source: str
    line: int

    @property
    def prompt(self) -> str:
        """Everything before the last trainable segment: what a generation eval feeds the model."""
        last = max(i for i, (_, trainable) in enumerate(self.segments) if trainable)
        return "".join(text for text, _ in self.segments[:last])

    @property
    def reference(self) -> str:
        """The last trainable segment: the answer a generation eval compares with."""
        return [text for text, trainable in self.segments if trainable][-1]


def _field(record: Record, name: str, required: bool = True) -> str:
    data = record.data
    if not isinstance(data, dict):
        raise DataError(record.path, record.line, f"expected a JSON object, found {type(data).__name__}")
    value = data.get(name)
    if value is None:
        if required:
            present = ", ".join(sorted(data)) or "none"
            raise DataError(record.path, record.line, f"missing field {name!r} (fields present: {present})")
        return ""
    if not isinstance(value, str):
        raise DataError(record.path, record.line, f"field {name!r} must be a string, found {type(value).__name__}")
    return value


def format_alpaca(record: Record, template: Template, columns: dict[str, str]) -> Sample:
    instruction = _field(record, columns.get("instruction", "instruction"))
    context = _field(record, columns.get("input", "input"), required=False)
    output = _field(record, columns.get("output", "output"))
    prompt = template.render_prompt(instruction, context)
    return Sample(((prompt, False), (output, True)), record.path, record.line)


def format_text(record: Record, template: Template, columns: dict[str, str]) -> Sample:
    return Sample(((_field(record, columns.get("text", "text")), True),), record.path, record.line)


FORMATS: dict[str, Callable[[Record, Template, dict[str, str]], Sample]] = {
    "alpaca": format_alpaca,
    "text": format_text,
}


def format_records(records: list[Record], fmt: str, template: Template,
                   columns: dict[str, str] | None = None) -> list[Sample]:
    formatter = FORMATS.get(fmt)
    if formatter is None:
        raise DataError(records[0].path if records else "data", None,
                        f"format {fmt!r} is not supported yet (supported: {', '.join(FORMATS)})")
    return [formatter(record, template, columns or {}) for record in records]
