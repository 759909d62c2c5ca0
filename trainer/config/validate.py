"""Turn a composed DictConfig into a validated `Config`, or raise one `ConfigError` naming the key.

Runs before anything heavy is imported: schema checks per section (each dataclass's __post_init__),
then checks that need several groups or the file system.
"""

from __future__ import annotations

import os
from typing import Any

from trainer.config.schema import Config
from trainer.errors import ConfigError

SECTIONS = ("run", "model", "data", "peft", "strategy", "optim", "train", "eval", "checkpoint", "logger",
            "launcher", "paths")


def _omegaconf_error_to_config_error(err: Exception, section: str) -> ConfigError:
    """OmegaConf's validation errors carry the full key; keep their first line, drop the object dump."""
    key = getattr(err, "full_key", None) or section
    if section and not str(key).startswith(section):
        key = f"{section}.{key}"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ConfigError(str(key), message)


def to_config(cfg: Any) -> Config:
    """Validate every section of the composed config and return the typed root."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _omegaconf_error_to_config_error(err, "") from None
    sections: dict[str, Any] = {}
    for section in SECTIONS:
        try:
            sections[section] = OmegaConf.to_object(cfg[section])
        except ConfigError as err:
            raise err.under(section) from None
        except OmegaConfBaseException as err:
            cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
            if cause is not None:
                raise cause.under(section) from None
            raise _omegaconf_error_to_config_error(err, section) from None
    config = Config(seed=cfg.seed, resume=cfg.resume, **sections)
    check_cross_group(config)
    return config


def check_cross_group(config: Config) -> None:
    """Checks that involve more than one field, or the file system."""
    if config.resume not in ("auto", "never") and not os.path.exists(config.resume):
        raise ConfigError("resume", f"{config.resume!r} does not exist: use auto, never, or a checkpoint dir")
    model = config.model
    if model.path is not None and not _looks_like_hub_id(model.path) and not os.path.isdir(model.path):
        raise ConfigError("model.path", f"{model.path!r} is not a directory: give a local model dir with config.json")
    if model.path is not None and os.path.isdir(model.path) and not os.path.isfile(os.path.join(model.path, "config.json")):
        raise ConfigError("model.path", f"{model.path!r} has no config.json: give a Hugging Face model dir")
    if config.data.path and not any(ch in config.data.path for ch in "*?[") and not os.path.exists(config.data.path):
        raise ConfigError("data.path", f"{config.data.path!r} does not exist")
    if config.data.val_path and not os.path.exists(config.data.val_path):
        raise ConfigError("data.val_path", f"{config.data.val_path!r} does not exist")
    if config.eval.early_stopping_patience and not config.eval.every_n_steps:
        raise ConfigError("eval.early_stopping_patience",
                          "needs periodic evaluation: set eval.every_n_steps > 0 (or patience 0 to disable)")
    micro, global_batch = config.train.micro_batch_size, config.train.global_batch_size
    if global_batch % micro:
        raise ConfigError("train.global_batch_size",
                          f"{global_batch} is not a multiple of train.micro_batch_size={micro}")


def _looks_like_hub_id(path: str) -> bool:
    """`org/name` with no leading ./ or / and not present locally: only meaningful where a hub is reachable."""
    if os.path.isabs(path) or path.startswith(".") or os.path.exists(path):
        return False
    return path.count("/") == 1 and os.environ.get("HF_HUB_OFFLINE", "0") != "1" and not os.environ.get(
        "TRAINER_OFFLINE")
