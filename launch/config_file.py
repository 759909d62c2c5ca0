"""A user's own config: `trainer train|plan|data check my.yaml [OVERRIDES]`, and Hydra's `-cd DIR` / `-cn NAME`.

`my.yaml` is composed over the defaults, as the command line is: its `defaults:` list picks group options
(`- model: llama-3.1-8b`, `- peft: qlora`) and every other value sets a key, with the schema's checks and the
closest-key suggestion for a typo. It is expanded into the overrides it stands for, in its place on the command
line, so what follows it on the command line wins. Peers take a config file the same way (`axolotl train x.yml`,
`tune run ... --config x.yaml`); Hydra alone would need the file to be a primary config that names ours.

`-cd DIR` / `-cn NAME` keep Hydra's meaning (DIR joins the config search path; NAME replaces `train` as the
primary config) for every command, not only `train`, whose entry point is Hydra's own.
"""

from __future__ import annotations

import os

from trainer.errors import ConfigError

CONFIG_SUFFIXES = (".yaml", ".yml")
DIR_FLAGS = ("-cd", "--config-dir")
NAME_FLAGS = ("-cn", "--config-name")
# Sections whose keys are the user's own (a config.json's fields, DeepSpeed JSON keys): set with Hydra's `++`.
FREE_FORM_SECTIONS = ("model.arch", "strategy.deepspeed_overrides")


def is_config_file(arg: str) -> bool:
    return not arg.startswith("-") and "=" not in arg and arg.endswith(CONFIG_SUFFIXES)


def expand_config_files(argv: list[str]) -> list[str]:
    """ARGV with each `path/to/file.yaml` replaced by the overrides it stands for."""
    expanded: list[str] = []
    for arg in argv:
        expanded += file_overrides(arg) if is_config_file(arg) else [arg]
    return expanded


def file_overrides(path: str) -> list[str]:
    from omegaconf import DictConfig, OmegaConf

    if not os.path.isfile(path):
        raise ConfigError("config file", f"{path!r} does not exist (a config file is given as path/to/file.yaml)")
    try:
        raw = OmegaConf.load(path)
    except Exception as err:  # YAML's own errors carry the line: keep it in the one line
        detail = " ".join(str(err).split())
        raise ConfigError("config file", f"{path}: not valid YAML: {detail}") from None
    if not isinstance(raw, DictConfig):
        raise ConfigError("config file", f"{path}: expected a mapping of keys (model:, data:, ...) at the top")
    content = OmegaConf.to_container(raw, resolve=False)
    choices = [_group_choice(path, entry) for entry in content.pop("defaults", None) or []]
    return [choice for choice in choices if choice] + _key_overrides(content, "")


def _group_choice(path: str, entry) -> str | None:
    """`- model: llama-3.1-8b` (or `- override model: ...`) -> model=llama-3.1-8b; `_self_` needs nothing."""
    if entry == "_self_":
        return None
    if not (isinstance(entry, dict) and len(entry) == 1):
        raise ConfigError("config file", f"{path}: each defaults entry picks one group option, like '- peft: lora'; "
                          f"got {entry!r}")
    (group, option), = entry.items()
    return f"{str(group).removeprefix('override ').strip()}={option}"


def _key_overrides(node: dict, prefix: str) -> list[str]:
    overrides = []
    for key, value in node.items():
        dotted = f"{prefix}{key}"
        free_form = dotted.startswith(FREE_FORM_SECTIONS)
        # A free-form section's own keys are set one by one; a map inside it (rope_scaling) is one value.
        if isinstance(value, dict) and value and (not free_form or dotted in FREE_FORM_SECTIONS):
            overrides += _key_overrides(value, f"{dotted}.")
        else:
            overrides.append(f"{'++' if free_form else ''}{dotted}={_value(value)}")
    return overrides


def _value(value) -> str:
    """A YAML value in Hydra's override grammar: strings quoted (interpolations survive), lists and maps nested."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def split_config_location(argv: list[str]) -> tuple[list[str], str | None, str | None]:
    """(the other arguments, -cd DIR, -cn NAME) from ARGV, in both `-cd DIR` and `--config-dir=DIR` forms."""
    rest: list[str] = []
    found = {"dir": None, "name": None}
    args = iter(argv)
    for arg in args:
        flag, eq, inline = arg.partition("=")
        kind = "dir" if flag in DIR_FLAGS else "name" if flag in NAME_FLAGS else None
        if kind is None:
            rest.append(arg)
            continue
        value = inline if eq else next(args, None)
        if not value:
            raise ConfigError(flag, "needs a value (a config dir for -cd, a config name for -cn)")
        found[kind] = value
    config_dir = found["dir"]
    if config_dir is not None:
        if not os.path.isdir(config_dir):
            raise ConfigError("--config-dir", f"{config_dir!r} is not a directory")
        config_dir = os.path.abspath(config_dir)
    return rest, config_dir, found["name"]
