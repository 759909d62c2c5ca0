"""Run a validated, frozen config with the launcher it names: the one place that dispatches on the launcher kind.

`local` trains on this machine (in this process, or as torchrun/deepspeed workers); `slurm` submits a job
whose workers train on the allocated nodes. Both read the same frozen `<run_dir>/config.yaml`.
"""

from __future__ import annotations

from trainer.config.schema import Config
from trainer.errors import ConfigError


def launch_run(config: Config, wait: bool = False) -> int:
    """Exit code of the run (local), or of the submission; `wait` makes a Slurm submission wait for the result."""
    kind = config.launcher.name
    if kind == "local":
        from launch.local import run_local

        return run_local(config)
    if kind == "slurm":
        from launch.slurm import submit

        return submit(config, wait=wait)
    raise ConfigError("launcher", f"no runner for launcher {kind!r} (local, slurm)")
