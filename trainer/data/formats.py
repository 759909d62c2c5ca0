"""Parse raw records into `Example`s: a conversation (system/user/assistant messages) or raw text segments.

A format knows which fields a record must have, what types they hold and which parts the loss is computed
on; it knows nothing about templates or tokenizers. Errors name the record's file and line and say what
was expected. Records that are well-formed but unusable (nothing to train on, a conversation that ends on
a user turn, a preference pair whose answers are identical) raise `Skip`, which the pipeline counts, or
turns into an error under `data.strict=true`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any, Callable

from trainer.config.schema import FORMAT_COLUMNS
from trainer.data.readers import Record
from trainer.errors import DataError

# Why a record is skipped, worded for the data-check table and for strict-mode errors.
SKIP_REASONS = {
    "empty": "nothing to train on: the answer is blank",
    "ends_on_user": "the conversation does not end with an assistant turn",
    "identical_pair": "the chosen and rejected answers are identical",
    "undesirable": "labelled undesirable (KTO \"label\": false): supervised fine-tuning trains only on desirable "
                   "answers",
}
# Skips that are the data working as its authors meant, not defects: data.strict=true does not refuse them.
INTENDED_SKIPS = ("undesirable",)
# Records kept for training but worth a look; counted in the report and refused under data.strict=true.
FLAG_REASONS = {
    "empty_turn": "an assistant turn before the last is blank: that turn is not trained on (the conversation is kept)",
    "turn_order": "questionable turn order (starts with the assistant, two turns of one role in a row, or no user "
                  "turn)",
}
CHAT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant"}
# Roles of tool-use conversations (OpenAI `tool`/`function`, ShareGPT `function_call`/`observation`).
TOOL_ROLES = ("tool", "function", "function_call", "observation", "ipython")


class Skip(Exception):
    """A well-formed record that cannot be trained on; `reason` is a key of SKIP_REASONS."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    content: str
    context: str = ""  # alpaca's `input`, kept apart so the alpaca template can give it its own section
    trainable: bool = True  # assistant turns only; OpenAI's `weight: 0` turns training off for one turn


@dataclass(frozen=True)
class Example:
    """One parsed record: `messages` for conversation formats, `raw` (text, trainable) pairs otherwise."""

    messages: tuple[Message, ...]
    raw: tuple[tuple[str, bool], ...]
    path: str
    line: int
    source: int = 0  # index of the configured source it came from
    rejected: tuple[Message, ...] = ()  # preference pairs: the rejected answer (the chosen one is in messages)
    flags: tuple[str, ...] = ()  # keys of FLAG_REASONS: kept, but counted in the report
    # KTO's `label`: whether the final answer is desirable (None: not labelled). The pipeline leaves undesirable
    # answers out of supervised fine-tuning (counted as skipped) and keeps them for the KTO objective.
    desirable: bool | None = None

    def text_key(self) -> str:
        """The content that de-duplication compares: roles and texts, nothing about where it came from."""
        if self.messages:
            parts = [f"{m.role}\x1e{m.content}\x1e{m.context}" for m in self.messages + self.rejected]
        else:
            parts = [text for text, _ in self.raw]
        return "\x1f".join(parts)


@dataclass(frozen=True)
class Sample:
    """A rendered example: text segments in order, each trained on or not, and what generation evals need."""

    segments: tuple[tuple[str, bool], ...]
    source: str  # file (or dataset) it came from
    line: int
    prompt: str = ""  # the text a generation eval feeds the model (up to the last answer)
    reference: str = ""  # the last answer, without template markup: what a generation eval compares with


# --------------------------------------------------------------------------------------------- fields
def _type_name(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number"}.get(type(value), type(value).__name__)


def _object(record: Record, what: str) -> dict:
    if not isinstance(record.data, dict):
        raise DataError(record.path, record.line, f"the record is {_type_name(record.data)} (expected {what})")
    return record.data


def _missing(record: Record, data: dict, key: str, expected: str) -> DataError:
    """The one wording of a missing field: which, what was expected, and which fields the record does have."""
    present = ", ".join(sorted(map(str, data))) or "none"
    return DataError(record.path, record.line, f"missing field {key!r} (expected {expected}; fields present: "
                     f"{present})")


def _text(record: Record, data: dict, key: str, what: str, required: bool = True) -> str:
    value = data.get(key)
    if value is None:
        if required:
            raise _missing(record, data, key, what)
        return ""
    if not isinstance(value, str):
        raise DataError(record.path, record.line, f"field {key!r} is {_type_name(value)} (expected a string)")
    return value


def _content(record: Record, value: Any, where: str) -> str:
    """Message content: a string, or OpenAI's list of text parts."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" and
                                       isinstance(p.get("text"), str) for p in value):
        return "".join(p["text"] for p in value)
    raise DataError(record.path, record.line, f"{where} has content that is {_type_name(value)} (expected a string, "
                    "or a list of {\"type\": \"text\", \"text\": ...} parts)")


def _messages(record: Record, value: Any, field: str, columns: dict, roles: dict, role_names: str) -> list[Message]:
    if not isinstance(value, list) or not value:
        found = "an empty list" if isinstance(value, list) else _type_name(value)
        raise DataError(record.path, record.line, f"field {field!r} is {found} (expected a non-empty list of "
                        "messages)")
    role_key, content_key = columns["role"], columns["content"]
    messages = []
    for number, item in enumerate(value, start=1):
        where = f"message {number} of {field!r}"
        if not isinstance(item, dict):
            raise DataError(record.path, record.line, f"{where} is {_type_name(item)} (expected an object with "
                            f"{role_key!r} and {content_key!r})")
        for key in (role_key, content_key):
            if key not in item:
                raise DataError(record.path, record.line, f"{where} has no {key!r} (expected {role_key!r} and "
                                f"{content_key!r} in every message)")
        role = item[role_key]
        if role in TOOL_ROLES or item.get("tool_calls") or item.get("function_call"):
            what = f"role {role!r}" if role in TOOL_ROLES else "tool calls"
            raise DataError(record.path, record.line, f"{where} has {what}: tool-use conversations are not supported "
                            "yet (expected plain system/user/assistant turns; leave such records out of the data)")
        if not isinstance(role, str) or role not in roles:
            raise DataError(record.path, record.line, f"{where} has unknown role {role!r} (expected one of "
                            f"{role_names})")
        trainable = True
        if "weight" in item:  # OpenAI fine-tuning files mark assistant turns to skip with weight 0
            if item["weight"] not in (0, 1) or isinstance(item["weight"], bool):
                raise DataError(record.path, record.line, f"{where} has weight {item['weight']!r} (expected 0 or 1)")
            trainable = item["weight"] == 1
        messages.append(Message(roles[role], _content(record, item[content_key], where), trainable=trainable))
    return messages


def _kto_label(record: Record, data: dict, example: Example) -> Example:
    """KTO files mark each answer desirable or not (`"label": true/false`): the example, labelled."""
    label = data.get("label")
    if label is None:
        return example
    if not isinstance(label, bool):
        raise DataError(record.path, record.line, f"field 'label' is {_type_name(label)} (expected true or false: "
                        "whether the answer is desirable, as in KTO data)")
    return replace(example, desirable=label)


def turn_order_problem(messages: list[Message]) -> str | None:
    """What is odd about the order of a conversation's turns, or None: after any system turns users and the
    assistant take turns, starting with the user."""
    turns = [m.role for m in messages if m.role != "system"]
    if "user" not in turns:
        return "it has no user turn"
    if turns[0] != "user":
        return "it starts with the assistant"
    for before, after in zip(turns, turns[1:]):
        if before == after:
            return f"two {before} turns in a row"
    return None


def _conversation(record: Record, messages: list[Message], source: int) -> Example:
    if messages[-1].role != "assistant":
        raise Skip("ends_on_user")
    if not any(m.content.strip() for m in messages if m.role == "assistant" and m.trainable):
        raise Skip("empty")
    flags = []
    if messages[0].role == "assistant":  # an opening greeting answers nothing: context for what follows, not trained
        messages = [Message("assistant", messages[0].content, trainable=False), *messages[1:]]
    # A blank answer mid-conversation would teach the model to answer with only its end-of-turn marker.
    blank = [i for i, m in enumerate(messages) if m.role == "assistant" and m.trainable and not m.content.strip()]
    if blank:
        messages = [Message(m.role, m.content, m.context, False) if i in blank else m for i, m in enumerate(messages)]
        flags.append("empty_turn")
    if turn_order_problem(messages):
        flags.append("turn_order")
    return Example(tuple(messages), (), record.path, record.line, source, flags=tuple(flags))


# -------------------------------------------------------------------------------------------- formats
def parse_alpaca(record: Record, columns: dict, source: int = 0) -> Example:
    data = _object(record, "an object with instruction, input and output")
    what = f"an alpaca record with {columns['instruction']!r}, {columns['output']!r} and optional {columns['input']!r}"
    instruction = _text(record, data, columns["instruction"], what)
    context = _text(record, data, columns["input"], what, required=False)
    output = _text(record, data, columns["output"], what)
    system = _text(record, data, columns["system"], what, required=False)
    if not output.strip():
        raise Skip("empty")
    messages = ([Message("system", system)] if system.strip() else []) + [
        Message("user", instruction, context=context), Message("assistant", output)]
    return Example(tuple(messages), (), record.path, record.line, source)


def parse_chat(record: Record, columns: dict, source: int = 0) -> Example:
    data = _object(record, f"an object with {columns['messages']!r}")
    if columns["messages"] not in data:
        raise _missing(record, data, columns["messages"], "a list of {role, content} messages")
    messages = _messages(record, data[columns["messages"]], columns["messages"], columns, CHAT_ROLES,
                         "system, user, assistant")
    return _kto_label(record, data, _conversation(record, messages, source))


def parse_sharegpt(record: Record, columns: dict, source: int = 0) -> Example:
    data = _object(record, f"an object with {columns['messages']!r}")
    if columns["messages"] not in data:
        raise _missing(record, data, columns["messages"], "a list of {from, value} turns")
    messages = _messages(record, data[columns["messages"]], columns["messages"], columns, SHAREGPT_ROLES,
                         "human, gpt, system")
    system = _text(record, data, columns["system"], "a string", required=False)
    if system.strip() and messages[0].role != "system":
        messages.insert(0, Message("system", system))
    return _kto_label(record, data, _conversation(record, messages, source))


def parse_text(record: Record, columns: dict, source: int = 0) -> Example:
    data = _object(record, f"an object with {columns['text']!r}")
    text = _text(record, data, columns["text"], "the document's text")
    if not text.strip():
        raise Skip("empty")
    return Example((), ((text, True),), record.path, record.line, source)


def parse_completion(record: Record, columns: dict, source: int = 0) -> Example:
    data = _object(record, "an object with prompt and completion")
    what = f"a completion record with {columns['prompt']!r} and {columns['completion']!r}"
    prompt = _text(record, data, columns["prompt"], what)
    completion = _text(record, data, columns["completion"], what)
    if not completion.strip():
        raise Skip("empty")
    return _kto_label(record, data, Example((), ((prompt, False), (completion, True)), record.path, record.line,
                                            source))


# Anthropic HH-RLHF writes each side as one string: "\n\nHuman: ...\n\nAssistant: ..." turns.
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant): ?")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}
PREFERENCE_ROLES = {**SHAREGPT_ROLES, **CHAT_ROLES}


def _hh_turns(text: str) -> list[Message] | None:
    """The turns of an HH-RLHF string, or None when the text is not written that way."""
    if not text.lstrip(" ").startswith(("\n\nHuman:", "Human:")):
        return None
    parts = _HH_TURN.split(text.lstrip(" "))
    if parts[0].strip():
        return None
    return [Message(_HH_ROLES[speaker], content.strip()) for speaker, content in zip(parts[1::2], parts[2::2])]


def _message_columns(items: list, columns: dict) -> dict:
    """Role/content keys for a message list: the configured ones, or ShareGPT's from/value when the items use those
    (LLaMA-Factory's preference files put a ShareGPT prompt beside chosen/rejected)."""
    first = items[0] if items and isinstance(items[0], dict) else {}
    if columns["role"] not in first and "from" in first and "value" in first:
        return {**columns, "role": "from", "content": "value"}
    return columns


def _preference_side(record: Record, value: Any, field: str, columns: dict) -> list[Message]:
    if isinstance(value, str):
        return _hh_turns(value) or [Message("assistant", value)]
    if isinstance(value, dict):  # one message: {"role": "assistant", "content": ...} or {"from": "gpt", "value": ...}
        value = [value]
    if isinstance(value, list):
        return _messages(record, value, field, _message_columns(value, columns), PREFERENCE_ROLES,
                         "system, user, assistant (or human, gpt)")
    raise DataError(record.path, record.line, f"field {field!r} is {_type_name(value)} (expected a string, a message "
                    "or a list of messages)")


def _preference_prompt(record: Record, data: dict, columns: dict) -> list[Message] | None:
    """The prompt of a pair: the prompt field (a string or messages), or a conversation field beside chosen and
    rejected (LLaMA-Factory: `conversations`), or None when chosen and rejected carry the whole conversation."""
    for key in (columns["prompt"], "conversations", "messages"):
        value = data.get(key)
        if value is None:
            continue
        if isinstance(value, str):
            return _hh_turns(value) or [Message("user", value)]
        return _messages(record, value, key, _message_columns(value, columns), PREFERENCE_ROLES,
                         "system, user, assistant (or human, gpt)")
    return None


def parse_preference(record: Record, columns: dict, source: int = 0) -> Example:
    """prompt/chosen/rejected as strings or message lists, or chosen/rejected as whole conversations that
    share everything but their final assistant turn (the prompt is then that shared part)."""
    data = _object(record, "an object with prompt, chosen and rejected")
    for key in (columns["chosen"], columns["rejected"]):
        if data.get(key) is None:
            raise _missing(record, data, key, f"a preference record with {columns['chosen']!r} and "
                           f"{columns['rejected']!r}")
    chosen = _preference_side(record, data[columns["chosen"]], columns["chosen"], columns)
    rejected = _preference_side(record, data[columns["rejected"]], columns["rejected"], columns)
    prompt = _preference_prompt(record, data, columns)
    if prompt is None:
        if chosen[:-1] != rejected[:-1] or len(chosen) < 2:
            raise DataError(record.path, record.line, "without a prompt field, chosen and rejected must be the same "
                            "conversation up to their final assistant turn (expected a shared prompt, then two "
                            "answers)")
        prompt, chosen, rejected = chosen[:-1], chosen[-1:], rejected[-1:]
    for side, field in ((chosen, columns["chosen"]), (rejected, columns["rejected"])):
        if side[-1].role != "assistant":
            raise DataError(record.path, record.line, f"field {field!r} ends with a {side[-1].role} turn (expected "
                            "it to end with the assistant's answer)")
    if not chosen[-1].content.strip() or not rejected[-1].content.strip():
        raise Skip("empty")
    if chosen == rejected:
        raise Skip("identical_pair")
    flags = ("turn_order",) if turn_order_problem(prompt + chosen) else ()
    return Example(tuple(prompt + chosen), (), record.path, record.line, source, rejected=tuple(rejected),
                   flags=flags)


PARSERS: dict[str, Callable[[Record, dict, int], Example]] = {
    "alpaca": parse_alpaca, "chat": parse_chat, "sharegpt": parse_sharegpt, "text": parse_text,
    "completion": parse_completion, "preference": parse_preference,
}


# Field layouts of well-known files that one of our formats reads under other names.
KNOWN_LAYOUTS = (
    ("alpaca", ("instruction", "response"), {"input": "context", "output": "response"}),  # Databricks Dolly
)


def _conversation_format(data: dict, key: str) -> tuple[str, dict] | None:
    """chat or sharegpt for a list of turns under KEY, told apart by the turns' own keys (role/content or
    from/value), whichever name the list has."""
    turns = data.get(key)
    if not isinstance(turns, list):
        return None
    first = turns[0] if turns and isinstance(turns[0], dict) else {}
    if "from" in first and "value" in first:
        return "sharegpt", {"messages": key}
    return "chat", {"messages": key}


def detect_format(record: Record, overrides: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """`data.format=auto`: the format whose telltale fields the first record of a source has, read under the user's
    data.columns names; returns the format and the column mapping to read it with. Preference pairs come first: a
    pair may also hold a conversation field (LLaMA-Factory's `conversations` prompt)."""
    data = record.data if isinstance(record.data, dict) else {}
    overrides = dict(overrides or {})

    def has(fmt: str, *fields: str) -> bool:
        return all(columns_for(fmt, overrides)[f] in data for f in fields)

    if has("preference", "chosen", "rejected"):
        return "preference", overrides
    for fmt in ("chat", "sharegpt"):
        found = _conversation_format(data, columns_for(fmt, overrides)["messages"])
        if found:
            return found[0], {**overrides, **found[1]}
    if has("alpaca", "instruction", "output"):
        return "alpaca", overrides
    for fmt, fields, columns in KNOWN_LAYOUTS:
        if all(f in data for f in fields) and not overrides:
            return fmt, columns
    if has("completion", "prompt", "completion"):
        return "completion", overrides
    if has("text", "text"):
        return "text", overrides
    present = ", ".join(sorted(map(str, data))) or "none"
    raise DataError(record.path, record.line, f"cannot tell the format from the fields {present} (expected "
                    f"messages, conversations, chosen/rejected, instruction/output, prompt/completion or text; "
                    "or set data.format, or map your field names with data.columns)")


def columns_for(fmt: str, overrides: dict[str, str]) -> dict[str, str]:
    """The record keys to read for a format: its own names, with the user's mapping applied."""
    columns = dict(FORMAT_COLUMNS[fmt])
    columns.update({key: value for key, value in overrides.items() if key in columns})
    return columns
