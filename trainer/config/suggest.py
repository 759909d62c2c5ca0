""""Did you mean": the closest existing key or option for a mistyped one, from the schemas themselves.

Used when wording composition errors (launch/compose.py), so `optim.lrr`, `train.max_step`, `peft.rank` or
`peft=lorra` are answered with the key or option the user most likely meant.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing

# Names other tools use for our keys (PEFT, HF Trainer, Axolotl): a close spelling cannot find these.
SYNONYMS = {
    "rank": "r", "lora_r": "r", "lora_rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "learning_rate": "lr", "batch_size": "micro_batch_size", "per_device_train_batch_size": "micro_batch_size",
    "num_train_epochs": "epochs", "num_epochs": "epochs", "sequence_len": "max_seq_len",
    "max_length": "max_seq_len", "seq_len": "max_seq_len", "steps": "max_steps", "bf16": "precision",
    "gradient_accumulation_steps": "global_batch_size", "output_dir": "dir",
}


def _fields(schema: type) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(schema)
    return {f.name: hints.get(f.name) for f in dataclasses.fields(schema)}


def _section_schemas(path: list[str]) -> list[type]:
    """The dataclasses that may hold the keys under PATH (every option of a polymorphic group)."""
    from trainer.config.schema import GROUP_OPTIONS, Config, DeepSpeedStrategyConfig

    schemas: list[type] = [Config]
    for part in path:
        found: list[type] = []
        for schema in schemas:
            if schema is Config and part in GROUP_OPTIONS:
                found += list(GROUP_OPTIONS[part].values()) + ([DeepSpeedStrategyConfig] if part == "strategy" else [])
                continue
            hint = _fields(schema).get(part)
            for candidate in (hint, *typing.get_args(hint)):
                if dataclasses.is_dataclass(candidate):
                    found.append(candidate)
        schemas = found
    return schemas


def suggest_key(key: str) -> str | None:
    """The existing dotted key closest to KEY, or None."""
    *parent, leaf = key.split(".")
    known: set[str] = set()
    for schema in _section_schemas(parent):
        known |= set(_fields(schema))
    if not known:
        return None
    match = SYNONYMS.get(leaf) if SYNONYMS.get(leaf) in known else None
    match = match or next(iter(difflib.get_close_matches(leaf, sorted(known), n=1, cutoff=0.6)), None)
    # The key itself exists, only under another option of its group (peft.dropout with peft=none): no spelling to
    # suggest; options_with_key says where it belongs.
    return ".".join([*parent, match]) if match and match != leaf else None


def options_with_key(key: str) -> list[str]:
    """For a key directly under a polymorphic group (`peft.dropout`), the group's options that have it."""
    from trainer.config.schema import GROUP_OPTIONS

    group, *rest = key.split(".")
    if group not in GROUP_OPTIONS or len(rest) != 1:
        return []
    return [name for name, schema in GROUP_OPTIONS[group].items() if rest[0] in _fields(schema)]


def unknown_key_message(key: str) -> str:
    """The one-line answer to an unknown KEY: its close spelling, or the options of its group that have it."""
    close = suggest_key(key)
    if close:
        return f"unknown key; did you mean {close}? (`trainer train --cfg job` lists the keys that exist)"
    options = options_with_key(key)
    if options:
        group = key.split(".")[0]
        return (f"not a key of the chosen {group} option; {group}={', '.join(options)} "
                f"{'has' if len(options) == 1 else 'have'} it: choose one of those ({group}={options[0]} {key}=...) "
                "or leave the key out")
    return "unknown key; check the spelling, or see `trainer train --cfg job` for the keys that exist"


def suggest_option(name: str, options: list[str]) -> str | None:
    return next(iter(difflib.get_close_matches(name, options, n=1, cutoff=0.6)), None)
