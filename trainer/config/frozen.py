"""The frozen run config: written once by the launcher, read by every worker.

Composing under torchrun would give each rank its own Hydra output dir and its own `${now:}`; instead
the launcher composes, validates and resolves once, and workers load `<run_dir>/config.yaml`.
Secrets never reach the file: values of keys that look like credentials are redacted.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict
from typing import Any

from trainer.config.schema import GROUP_OPTIONS, Config, schema_for_option

FROZEN_NAME = "config.yaml"
_SECRET_KEY = re.compile(r"(^|_)(api_?key|token|secret|password|passwd)$", re.IGNORECASE)
REDACTED = "***"


def redact(value: Any) -> Any:
    """A copy of a nested dict/list with credential-like keys' values replaced."""
    if isinstance(value, dict):
        return {k: (REDACTED if _SECRET_KEY.search(str(k)) and v else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def is_secret_key(key: str) -> bool:
    """A dotted or plain key whose last part names a credential (api_key, hf_token, password, ...)."""
    return bool(_SECRET_KEY.search(str(key).rsplit(".", 1)[-1]))


def redact_argv(argv: list[str]) -> list[str]:
    """A command line with the values of credential-like overrides (`+model.arch.hf_token=...`) replaced: what W&B
    and the lock file record of the command must not hold what config.yaml hides."""
    redacted = []
    for arg in argv:
        key, eq, value = arg.partition("=")
        redacted.append(f"{key}={REDACTED}" if eq and value and is_secret_key(key.lstrip("+~")) else arg)
    return redacted


def config_to_dict(config: Config) -> dict:
    return redact(asdict(config))


def save_frozen(config: Config, run_dir: str) -> str:
    """Write config.yaml atomically (temp file + rename) so a crash never leaves half a config."""
    from omegaconf import OmegaConf

    os.makedirs(run_dir, exist_ok=True)
    path = os.path.join(run_dir, FROZEN_NAME)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config))))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path


def load_frozen(path: str) -> Config:
    """Read a frozen config back into the typed schema (re-running every check)."""
    from omegaconf import OmegaConf

    from trainer.config.validate import to_config

    if os.path.isdir(path):
        path = os.path.join(path, FROZEN_NAME)
    raw = OmegaConf.load(path)
    schema = OmegaConf.structured(Config)
    for group in GROUP_OPTIONS:
        schema[group] = OmegaConf.structured(schema_for_option(group, raw[group]["name"]))
    return to_config(OmegaConf.merge(schema, raw))
