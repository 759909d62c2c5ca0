"""Shared Hydra plumbing: where conf/ lives, our resolvers, and turning Hydra's errors into one line."""

from __future__ import annotations

import os
from pathlib import Path

from trainer.config.suggest import suggest_option, unknown_key_message
from trainer.errors import ConfigError

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
ASSETS_DIR = Path(__file__).resolve().parent.parent / "trainer" / "assets"


def asset_path(name: str) -> str:
    """`${asset:tiny-llama}` -> the absolute path of a file or dir shipped in trainer/assets/."""
    return str(ASSETS_DIR / name)


DEMO_TRAIN_FILE = "demo-facts/train.jsonl"


def with_demo_data(value: str, *, _root_) -> str | None:
    """`${with_demo_data:FILE}`: FILE while data.path is the demo's training file, else null. The demo's validation
    and forgetting files belong to its data: `data.path=my.jsonl` drops them, while a file the user names for those
    keys replaces the interpolation itself and always stays."""
    return value if _root_.data.path == asset_path(DEMO_TRAIN_FILE) else None


def path_label(path: str | None) -> str:
    """`${path_label:${.path}}`: a model dir's name, for run names (`/models/Llama-3.1-8B/` -> Llama-3.1-8B)."""
    if not path:
        return "model"
    return os.path.basename(os.path.normpath(str(path))) or "model"


def _data_label(data) -> str:
    if not data.get("path"):
        return "mix" if data.get("sources") else "data"
    path = str(data.path).split("*")[0].rstrip("/") or str(data.path)
    stem = os.path.basename(os.path.normpath(path))
    for suffix in (".gz", ".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".md"):
        stem = stem.removesuffix(suffix)
    return stem or "data"


def run_label(*, _root_) -> str:
    """`${run_label:}`: the default run.name, from what the run trains: model, data and method
    (`Llama-3.1-8B-Instruct-alpaca_100-lora`), so runs of different jobs never share a name."""
    label = f"{_root_.model.name}-{_data_label(_root_.data)}-{_root_.peft.name}"
    return "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in label)


# Overrides that name what a run trains: with none of them, `trainer train` runs the embedded demo.
RUN_INPUT_KEYS = ("model", "data", "experiment", "model.path", "model.arch", "data.path", "data.sources")
DEMO_EXPERIMENT = "experiment=demo"


def names_run_inputs(override: str) -> bool:
    key = override.lstrip("+~").split("=", 1)[0]
    return key in RUN_INPUT_KEYS or key.startswith("model.arch.")


def with_demo_default(overrides: list[str]) -> list[str]:
    """OVERRIDES, plus experiment=demo when none of them names a model, data or experiment: bare `trainer train`
    is the embedded demo, while a user's own model or data never inherits the demo's settings."""
    own_config = {"-cd", "--config-dir", "-cn", "--config-name", "-cp", "--config-path"} & {
        o.split("=", 1)[0] for o in overrides}
    if own_config or any(names_run_inputs(o) for o in overrides if not o.startswith("-")):
        return list(overrides)  # a user's own primary config decides for itself
    return [*overrides, DEMO_EXPERIMENT]


def setup_hydra() -> None:
    """Register schemas and resolvers (idempotent). Hydra re-raises errors so we can word them."""
    from omegaconf import OmegaConf

    from trainer.config.store import register_schemas

    os.environ["HYDRA_FULL_ERROR"] = "1"
    register_schemas()
    if not OmegaConf.has_resolver("asset"):
        OmegaConf.register_new_resolver("asset", asset_path)
    if not OmegaConf.has_resolver("with_demo_data"):
        OmegaConf.register_new_resolver("with_demo_data", with_demo_data)
    if not OmegaConf.has_resolver("path_label"):
        OmegaConf.register_new_resolver("path_label", path_label)
    if not OmegaConf.has_resolver("run_label"):
        OmegaConf.register_new_resolver("run_label", run_label)


# Sections whose keys are the user's own (a config.json's fields, DeepSpeed JSON keys): new keys need Hydra's '+'.
FREE_FORM_SECTIONS = ("model.arch.", "strategy.deepspeed_overrides.")


def hydra_error_to_config_error(err: Exception) -> ConfigError | None:
    """Word Hydra's/OmegaConf's composition errors as one line naming the key; None if not a config error."""
    from hydra.errors import HydraException, MissingConfigException
    from omegaconf.errors import OmegaConfBaseException

    if not isinstance(err, (HydraException, OmegaConfBaseException)):
        return None
    # A mistake inside a config file (a user's experiment YAML) comes wrapped: "In 'experiment/mine': ConfigKeyError
    # raised while composing config:", with the key in the OmegaConf error it was raised from.
    linked = err.__cause__ or err.__context__
    cause = linked if isinstance(linked, OmegaConfBaseException) else None
    source = cause or err
    in_file = str(err).split("'")[1] if cause is not None and str(err).startswith("In '") else None
    key = getattr(source, "full_key", None)
    message = str(getattr(source, "msg", None) or source).strip().splitlines()
    first = message[0] if message else type(source).__name__
    if isinstance(err, MissingConfigException):
        options = [o for o in getattr(err, "options", None) or [] if not o.startswith("schema_")]
        hint = f" (available: {', '.join(options)})" if options else ""
        first = first.split(" (available")[0].replace("In 'train': ", "")
        asked = first.split("'")[1].rsplit("/", 1)[-1] if first.count("'") >= 2 else ""
        close = suggest_option(asked, options) if asked else None
        hint += f"; did you mean {close}?" if close else ""
        return ConfigError("defaults", f"{first}{hint}")
    if "LexerNoViableAltException" in first or "mismatched input" in first or "no viable alternative" in first:
        return _override_syntax_error(first)
    if "is not in struct" in first or "Key '" in first and "not in" in first:
        first = "unknown key; check the spelling, or see `trainer train --cfg job` for the keys that exist"
        if str(key).startswith(FREE_FORM_SECTIONS):
            first = (f"not set yet in this free-form section: add it with a leading '+' (+{key}=VALUE), "
                     f"or give the whole section as +{str(key).rsplit('.', 1)[0]}={{...}}")
    if "Could not override" in first and not key:
        # Hydra's wording: "Could not override 'x'.\nTo append to your config use +x=1\nKey 'x' is not in struct"
        key = first.split("'")[1] if "'" in first else "override"
        first = "unknown key; check the spelling, or see `trainer train --cfg job` for the keys that exist"
    if first.startswith("unknown key") and key:
        first = unknown_key_message(str(key))
    if in_file:
        first = f"{first} (in {in_file}.yaml)"
    return ConfigError(str(key or "config"), first)


def _override_syntax_error(first: str) -> ConfigError:
    """Hydra's override grammar takes unquoted values of ASCII letters, digits and a few symbols only: a path with
    `ü`, a space or a `=` in it fails in its lexer, whose message shows neither the cause nor the remedy."""
    override = first.split(": ", 1)[1].strip() if ": " in first else first
    key, _, value = override.partition("=")
    if not value:
        return ConfigError("override", f"cannot parse {override!r}: overrides are KEY=VALUE")
    return ConfigError(key.lstrip("+~") or "override",
                       f"cannot parse the value {value!r}: quote it (non-ASCII letters, spaces and most symbols "
                       f"need quotes), e.g. '{key}=\"{value}\"' in the shell")


def compose_train_config(overrides: list[str]):
    """The raw composed `train` config for OVERRIDES (Hydra's compose API: no run dir, no job), errors as one line."""
    from hydra import compose, initialize_config_dir

    from launch.config_file import expand_config_files, split_config_location

    setup_hydra()
    overrides, config_dir, config_name = split_config_location(expand_config_files(overrides))
    own = [f"hydra.searchpath=[file://{config_dir}]"] if config_dir else []
    if not (config_dir or config_name):
        overrides = with_demo_default(overrides)  # a user's own primary config decides for itself
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            return compose(config_name=config_name or "train", overrides=own + overrides)
    except Exception as err:  # Hydra's composition errors: word them as one line naming the key
        config_error = hydra_error_to_config_error(err)
        if config_error is None:
            raise
        raise config_error from None
