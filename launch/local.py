"""Run a frozen config on this machine: in this process, or as torchrun workers."""

from __future__ import annotations

from trainer.config.schema import Config


def run_local(config: Config) -> int:
    from trainer.recipe import run_training

    return run_training(config)
