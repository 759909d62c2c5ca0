"""What `trainer serve` serves: the base model dir, each adapter's dir under its name, and the chat template.

Sources are model dirs, run dirs (their final/) or registry references (registry:NAME@ALIAS, registry:NAME/3). An
adapter must belong to the base: the base it was trained on (its run's model.path, or the registry's lineage) must
have the served base's config.json, and its tensors must have the shapes that base gives them. Everything is checked
here, before an engine is started or a GGUF file written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from launch.generate import check_shapes, choose_template, final_dir, is_adapter
from trainer.errors import UserError
from trainer.registry import REFERENCE_PREFIX


@dataclass
class Adapter:
    name: str
    path: str  # the adapter dir (adapter_config.json, adapter_model.safetensors)
    given: str  # as the user named it
    expected_base_config: str | None = None  # sha256 of the config.json it was trained on, when known
    rank: int = 0


@dataclass
class Served:
    base_dir: str
    base_name: str
    adapters: list[Adapter] = field(default_factory=list)
    template_name: str = "tokenizer"  # what the chat endpoint renders with
    chat_template: str | None = None  # its Jinja form; None: the tokenizer's own


class SourceResolver:
    """Turns what the user named into local dirs, fetching registry references through MLflow."""

    def __init__(self, registry_uri: str):
        self.registry_uri = registry_uri
        self.registry_tags: dict[str, dict] = {}  # local dir -> the registered version's tags

    def local(self, given: str, what: str) -> str:
        if given.startswith(REFERENCE_PREFIX):
            from trainer.registry import fetch_version

            path, version = fetch_version(given, self.registry_uri)
            self.registry_tags[os.path.abspath(path)] = dict(version.tags)
            return path
        if not os.path.isdir(given):
            raise UserError(f"serve: {what} {given!r} is not a model dir, run dir or registry:NAME@ALIAS reference")
        return final_dir(given)


def _base_of(adapter_dir: str) -> str | None:
    """The base model dir an adapter was trained on: its run's model.path, else adapter_config.json's."""
    from trainer.adapters import read_adapter_config, read_run_config

    run = read_run_config(adapter_dir)
    path = (run.get("model") or {}).get("path") or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    return path if path and os.path.isdir(path) else None


def _expected_config_hash(adapter_dir: str, tags: dict | None) -> str | None:
    from trainer.lineage import model_identity

    if tags and tags.get("lineage.base_model.config_sha256"):
        return tags["lineage.base_model.config_sha256"]
    base = _base_of(adapter_dir)
    return model_identity(base).get("config_sha256") if base else None


def resolve(source: str, adapter_specs: list[str], registry_uri: str, base_name: str | None = None,
            template: str = "auto") -> Served:
    from trainer.adapters import read_adapter_config
    from trainer.lineage import model_identity

    resolver = SourceResolver(registry_uri)
    source_dir = resolver.local(source, "BASE")
    pairs: list[tuple[str, str, str]] = []  # (name, given, dir)
    if is_adapter(source_dir):  # a PEFT run or a registered adapter: its base is served, the adapter beside it
        base_dir = _base_of(source_dir)
        if base_dir is None:
            raise UserError(f"serve: {source} is an adapter whose base model dir is not here; give the base model "
                            "dir as BASE and the adapter with --adapter NAME=...")
        name = source.removeprefix(REFERENCE_PREFIX).split("@")[0].split("/")[0] if source.startswith(
            REFERENCE_PREFIX) else os.path.basename(os.path.dirname(os.path.abspath(source_dir)))
        pairs.append((name, source, source_dir))
    else:
        base_dir = source_dir
    if not os.path.isfile(os.path.join(base_dir, "config.json")):
        raise UserError(f"serve: {base_dir} has no config.json: BASE must be a model dir, a run dir or a registered "
                        "model")
    names = {name for name, _, _ in pairs}
    for spec in adapter_specs:
        name, sep, given = spec.partition("=")
        if not sep or not name or not given:
            raise UserError(f"serve: --adapter {spec!r}: expected NAME=PATH (a run dir, adapter dir or "
                            "registry:NAME@ALIAS)")
        if name in names:
            raise UserError(f"serve: adapter name {name!r} is given twice")
        names.add(name)
        path = resolver.local(given, f"--adapter {name}")
        if not is_adapter(path):
            raise UserError(f"serve: --adapter {name}={given}: not an adapter (no adapter_config.json); a full model "
                            "is served as BASE on its own")
        pairs.append((name, given, path))
    if not base_name and source.startswith(REFERENCE_PREFIX) and not pairs:  # a registered model: its name
        base_name = source.removeprefix(REFERENCE_PREFIX).split("@")[0].split("/")[0]
    base_name = base_name or os.path.basename(os.path.abspath(
        base_dir if not os.path.basename(base_dir) == "final" else os.path.dirname(base_dir)))
    if base_name in names:
        raise UserError(f"serve: the base is served as {base_name!r}, which an adapter is named too: rename the "
                        "adapter or give --base-name")
    base_hash = model_identity(base_dir).get("config_sha256")
    adapters = []
    for name, given, path in pairs:
        expected = _expected_config_hash(path, resolver.registry_tags.get(os.path.abspath(path)))
        if expected and expected != base_hash:
            raise UserError(f"serve: adapter {name} ({given}) was trained on another base model (its config.json "
                            f"sha256 {expected[:12]}, the served base {base_dir} has {str(base_hash)[:12]}): serve it "
                            "with the base it was trained on")
        check_shapes(base_dir, True, [path], False, command="serve")
        adapters.append(Adapter(name, path, given, expected, int(read_adapter_config(path).get("r") or 0)))
    served = Served(base_dir, base_name, adapters)
    _choose_template(served, template)
    return served


def _choose_template(served: Served, requested: str) -> None:
    """The chat template the adapters were trained with (they must agree: one base file serves them all)."""
    from transformers import AutoTokenizer

    from trainer.adapters import read_run_config
    from trainer.data.jinja_templates import as_jinja

    tokenizer = AutoTokenizer.from_pretrained(served.base_dir)
    chosen: dict[str, tuple[str, str | None]] = {}
    for adapter in served.adapters or [None]:
        # the base alone: the run that trained it, when it is a run's final/ or a registered model (config.yaml)
        run_config = read_run_config(adapter.path if adapter else served.base_dir)
        template = choose_template(requested, tokenizer, run_config)
        jinja = as_jinja(template, tokenizer.bos_token)
        chosen[adapter.name if adapter else served.base_name] = (getattr(template, "name", "none"), jinja)
    if len({jinja for _, jinja in chosen.values()}) > 1:
        listing = ", ".join(f"{name}: {template}" for name, (template, _) in chosen.items())
        raise UserError(f"serve: the adapters were trained with different chat templates ({listing}); one server "
                        "renders chat requests one way: serve them separately, or choose one with --template")
    served.template_name, served.chat_template = next(iter(chosen.values()))
    if served.chat_template == getattr(tokenizer, "chat_template", None):
        served.chat_template = None  # the tokenizer's own: already in the model files
