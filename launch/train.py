"""`trainer train`: compose with Hydra, validate, freeze into the run dir, then run here."""

from __future__ import annotations

import os
import sys

from launch.compose import CONF_DIR, hydra_error_to_config_error, setup_hydra
from trainer.errors import EXIT_USER_ERROR, UserError


def _task(cfg) -> int:
    from launch.local import run_local
    from trainer.config.frozen import save_frozen
    from trainer.config.validate import to_config

    config = to_config(cfg)
    save_frozen(config, config.run.dir)
    return run_local(config)


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (a previous run's files) or already gone: leave it


def main(argv: list[str]) -> int:
    import hydra
    from hydra.core.hydra_config import HydraConfig

    setup_hydra()
    exit_code = 0

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
    def entry(cfg) -> None:
        nonlocal exit_code
        try:
            exit_code = _task(cfg) or exit_code
        except UserError as err:
            _remove_if_empty(HydraConfig.get().runtime.output_dir)  # Hydra made it before we could validate
            # Raised past Hydra's job runner as SystemExit so it adds no "Error executing job" banner.
            sys.stderr.write(f"trainer: {err}\n")
            raise SystemExit(EXIT_USER_ERROR) from None

    saved_argv = sys.argv
    sys.argv = ["trainer train", *argv]
    try:
        entry()
    except Exception as err:  # Hydra re-raises everything under HYDRA_FULL_ERROR; word config errors
        config_error = hydra_error_to_config_error(err)
        if config_error is None:
            raise
        raise config_error from None
    finally:
        sys.argv = saved_argv
    return exit_code
