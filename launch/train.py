"""`trainer train`: compose with Hydra, validate, freeze into the run dir, then run here or submit to Slurm."""

from __future__ import annotations

import os
import sys

from launch.compose import CONF_DIR, hydra_error_to_config_error, setup_hydra, with_demo_default
from trainer.errors import EXIT_USER_ERROR, UserError

# Printed above Hydra's own help (its config groups and every key), which knows nothing of my.yaml.
USAGE = """\
usage: trainer train [my.yaml] [OVERRIDES] [-cd DIR] [-cn NAME] [-m] [--cfg job]

  my.yaml    your own config file, composed over the defaults like the overrides (README: your own config file)
  -cd DIR    add DIR to the config search path (your own experiment/, model/ ... options); -cn NAME: primary config

"""


def _task(cfg) -> int:
    if cfg.launcher.name != "local":
        from trainer.preemption import unwatch

        # Only a local run answers signals with a checkpoint (launch/local.py passes them on to its workers); a
        # Slurm submission, or the wait for its result, ends on a signal as any command does.
        unwatch()
    from launch.auto_strategy import resolve_auto_strategy
    from launch.run import launch_run
    from launch.sweep import needs_result, prepare_point, record_point
    from trainer.config.frozen import save_frozen
    from trainer.config.validate import to_config
    from trainer.preflight import preflight
    from trainer.run_identity import check_checkpoint_source, check_resume

    point = prepare_point(cfg)  # in a sweep: the point's own run dir (the sweep subdir), the sweep's W&B group
    cfg.run.dir = os.path.abspath(cfg.run.dir)  # the frozen config names its own dir wherever the job runs
    notes: list[str] = []
    config = to_config(cfg, notes)
    _say_defaults(notes)
    _warn_if_demo_data_under_another_model(config)
    config = resolve_auto_strategy(config)  # strategy=auto -> a concrete strategy, frozen as such (else unchanged)
    # Model files, attention kernels and PEFT module names: before a run dir or a worker exists. A Slurm dry run only
    # prints the job script; the model it names may not be on this host yet.
    if not (config.launcher.name == "slurm" and config.launcher.dry_run):
        preflight(config)
    # Ours to remove on failure only if it held nothing before (Hydra may have just created it, empty).
    fresh = not os.path.isdir(config.run.dir) or not os.listdir(config.run.dir)
    try:
        with _run_dir_lock(config):
            # The run's identity: a resume may change only what is safe (trainer/run_identity.py); checked before
            # anything is written, so a refused command leaves config.yaml as it was.
            if check_resume(config, config.run.dir):
                save_frozen(config, config.run.dir)
            if config.resume not in ("auto", "never"):
                check_checkpoint_source(config, config.resume)
            if point is not None:
                record_point(config.run.dir, point)
            if config.launcher.name == "local":  # trains here: the lock is held until the run ends
                return launch_run(config, wait=needs_result(point))
        # Slurm: the job script takes the lock on its first node for the job's life, so this process must not hold
        # it while it submits and perhaps waits for that job.
        return launch_run(config, wait=needs_result(point))
    except UserError:
        if fresh:
            _remove_if_it_never_trained(config.run.dir)
        raise


def _run_dir_lock(config):
    """The run dir's lock for this command's life (trainer/run_lock.py). Several nodes started by hand: only
    node_rank 0's command holds it (the others join that job)."""
    import contextlib

    from trainer.run_lock import RunLock

    if config.launcher.name == "local" and config.launcher.node_rank != 0:
        return contextlib.nullcontext()
    return RunLock(config.run.dir)


def _say_defaults(notes: list[str], stream=None) -> None:
    """The values decided for this run, on one line (stdout, so that a user error on stderr stays one line)."""
    if notes:
        print(f"trainer: defaults for this model and data: {'; '.join(notes)}", file=stream or sys.stdout, flush=True)


def _warn_if_demo_data_under_another_model(config) -> None:
    from launch.compose import DEMO_TRAIN_FILE, asset_path

    if config.data.path == asset_path(DEMO_TRAIN_FILE) and config.model.path != asset_path("tiny-llama"):
        sys.stderr.write("trainer: warning: data.path is not set, so this model trains on the embedded demo's "
                         "questions; give data.path=YOUR_FILE\n")


def _wants_job_config(argv: list[str]) -> bool:
    """`--cfg job` (or `-c job`) outside a sweep: print the config as the run would freeze it."""
    flags = {"-m", "--multirun"}
    return not flags & set(argv) and any(a in ("--cfg", "-c") and argv[i + 1:i + 2] == ["job"]
                                         for i, a in enumerate(argv))


def print_job_config(argv: list[str]) -> int:
    """What the run would freeze: composed, validated, with every default decided and strategy=auto resolved --
    unlike Hydra's own `--cfg job`, which prints the raw composition and so exits 0 for configs train refuses."""
    from omegaconf import OmegaConf

    from launch.auto_strategy import resolve_auto_strategy
    from launch.compose import compose_train_config
    from trainer.config.frozen import config_to_dict
    from trainer.config.validate import to_config
    from trainer.preflight import preflight

    overrides, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
        elif arg in ("--cfg", "-c") and argv[i + 1:i + 2] == ["job"]:
            skip = True
        elif arg not in ("--resolve",):
            overrides.append(arg)
    notes: list[str] = []
    config = resolve_auto_strategy(to_config(compose_train_config(overrides), notes))
    preflight(config, files=False)
    _say_defaults(notes, sys.stderr)  # stdout is the YAML
    sys.stdout.write(OmegaConf.to_yaml(OmegaConf.create(config_to_dict(config))))
    return 0


def _remove_if_it_never_trained(run_dir: str) -> None:
    """A run dir this command created, whose run stopped on a user error (bad data, a checkpoint that cannot load,
    a refused submission) before its first step: it holds only the frozen config, so nothing of value goes with
    it, and a corrected command starts clean instead of resuming from it. Anything trained is kept."""
    import shutil

    from trainer.run_identity import has_trained

    if not has_trained(run_dir):
        shutil.rmtree(run_dir, ignore_errors=True)


def _sweep_result(cfg):
    """What a sweeper sees of this point: the run.objective metric (Optuna optimises it); None outside sweeps."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    from launch.sweep import objective_value

    return objective_value(cfg.run.dir, cfg.run.objective)


def _remove_if_empty(path: str) -> None:
    try:
        os.rmdir(path)
    except OSError:
        pass  # not empty (a previous run's files) or already gone: leave it


# Hydra's options and how many values each takes. Its parser ends the overrides at the first option, so in
# `trainer train my.yaml -m optim.lr=1e-3,2e-3` (the file's overrides, then -m) the sweep's values went unparsed.
# (--info takes an optional value: give it as --info=config.)
_HYDRA_OPTIONS = {"-m": 0, "--multirun": 0, "-r": 0, "--run": 0, "--resolve": 0, "-h": 0, "--help": 0,
                  "--hydra-help": 0, "--version": 0, "-i": 0, "--info": 0, "-cd": 1, "--config-dir": 1, "-cn": 1,
                  "--config-name": 1, "-cp": 1, "--config-path": 1, "--cfg": 1, "-c": 1, "-p": 1, "--package": 1,
                  "-sc": 1, "--shell-completion": 1, "--experimental-rerun": 1}


def options_first(argv: list[str]) -> list[str]:
    """ARGV with Hydra's options (and their values) moved before the overrides, each group in its own order."""
    options, overrides = [], []
    index = 0
    while index < len(argv):
        arg = argv[index]
        arity = _HYDRA_OPTIONS.get(arg.split("=", 1)[0]) if arg.startswith("-") else None
        if arity is None:
            overrides.append(arg)
            index += 1
            continue
        taken = 1 if "=" in arg else 1 + arity
        options += argv[index:index + taken]
        index += taken
    return options + overrides


def main(argv: list[str]) -> int:
    from launch.config_file import expand_config_files

    argv = options_first(expand_config_files(argv))  # `trainer train my.yaml ...`: the file's overrides in its place
    if {"-h", "--help"} & set(argv):
        sys.stdout.write(USAGE)  # then Hydra's help below it
    elif _wants_job_config(argv):
        return print_job_config(argv)
    import hydra
    from hydra.core.hydra_config import HydraConfig

    setup_hydra()
    exit_code = 0

    @hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
    def entry(cfg) -> float | None:
        nonlocal exit_code
        try:
            exit_code = _task(cfg) or exit_code
        except UserError as err:
            _remove_if_empty(HydraConfig.get().runtime.output_dir)  # Hydra made it before we could validate
            # Raised past Hydra's job runner as SystemExit so it adds no "Error executing job" banner.
            sys.stderr.write(f"trainer: {err}\n")
            raise SystemExit(getattr(err, "exit_code", EXIT_USER_ERROR)) from None
        return _sweep_result(cfg)

    saved_argv = sys.argv
    sys.argv = ["trainer train", *with_demo_default(argv)]
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
