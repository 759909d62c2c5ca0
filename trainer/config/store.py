"""Register the schemas in Hydra's ConfigStore so that every YAML in conf/ is checked against one.

The root schema `trainer_schema` is the first entry of conf/train.yaml's defaults list. Options of the
polymorphic groups extend `<group>/schema_<option>` in their YAML's own defaults list.
"""

from __future__ import annotations

from trainer.config.schema import GROUP_OPTIONS, Config

_registered = False


def register_schemas() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name="trainer_schema", node=Config)
    for group, options in GROUP_OPTIONS.items():
        for option, schema in options.items():
            store.store(group=group, name=f"schema_{option}", node=schema)
    _registered = True
