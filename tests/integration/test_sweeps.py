"""Sweeps on this machine: `trainer train -m` runs each point in its own run dir, one after another, and ends
with the summary table; Optuna optimises run.objective read from each trial's summary.json."""

from __future__ import annotations

import csv
import json

import pytest
import yaml

from tests.conftest import read_summary, run_cli

pytestmark = pytest.mark.slow

TINY = ("train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
        "eval.generate_samples=0", "logger.progress=false", "logger.plot=false")


def _rows(sweep_dir) -> list[dict]:
    with open(sweep_dir / "sweep_summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_grid_points_get_their_own_run_dirs_a_shared_wandb_group_and_a_summary(tmp_path):
    """Here from a user's own config dir (`-cd DIR experiment=NAME`) and config file (`my.yaml`), which every point
    composes like the command line (the plain-overrides sweep is the Optuna test below)."""
    (tmp_path / "conf" / "experiment").mkdir(parents=True)
    (tmp_path / "conf" / "experiment" / "tiny-sweep.yaml").write_text(  # TINY's train and eval values, and one more
        "# @package _global_\ndata:\n  max_seq_len: 96\ntrain:\n  max_steps: 2\n  micro_batch_size: 4\n"
        "  global_batch_size: 8\neval:\n  max_batches: 1\n  generate_samples: 0\n")
    (tmp_path / "mine.yaml").write_text("seed: 7\nlogger:\n  progress: false\n  plot: false\n")  # TINY's logger values
    sweep_dir = tmp_path / "sweep"
    # Options among the overrides, as people type them (Hydra's own parser wants its options first).
    result = run_cli("train", str(tmp_path / "mine.yaml"), "-cd", str(tmp_path / "conf"), "experiment=tiny-sweep",
                     "-m", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep_dir}", "run.dir=/ignored")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run.dir is ignored in a sweep" in result.stderr
    for num, lr in ((0, 0.001), (1, 0.002)):
        run_dir = sweep_dir / str(num)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["run"]["dir"] == str(run_dir) and config["optim"]["lr"] == lr
        assert (config["data"]["max_seq_len"], config["train"]["max_steps"], config["eval"]["generate_samples"]) == (
            96, 2, 0)  # the config dir's experiment
        assert (config["seed"], config["logger"]["plot"]) == (7, False)  # the config file
        assert read_summary(run_dir)["steps"] == 2
        assert config["logger"]["wandb"]["group"] == "sweep"
        assert read_summary(run_dir)["status"] == "completed"
        assert json.loads((run_dir / "sweep_point.json").read_text())["num"] == num
    rows = _rows(sweep_dir)  # written by the end-of-sweep callback, no command needed
    assert [(r["run"], r["optim.lr"]) for r in rows] == [("0", "0.001"), ("1", "0.002")]  # only the swept key varies
    assert (sweep_dir / "sweep_summary.md").read_text() in result.stdout
    assert sum(bool(r["best"]) for r in rows) == 1 and "| **best** |" in result.stdout


def test_optuna_search_minimises_the_eval_loss_each_trial_reports(tmp_path):
    sweep_dir = tmp_path / "optuna"
    result = run_cli("train", "-m", "experiment=sweep-lora-optuna", "hydra.sweeper.n_trials=2",
                     f"hydra.sweep.dir={sweep_dir}", "eval.every_n_steps=0", "eval.early_stopping_patience=0", *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    optuna = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    losses = {num: read_summary(sweep_dir / str(num))["eval_after"]["loss"] for num in (0, 1)}
    assert optuna["best_value"] == pytest.approx(min(losses.values()))
    best_run = min(losses, key=losses.get)
    rows = _rows(sweep_dir)
    assert [r["run"] for r in rows if r["best"]] == [str(best_run)]
    assert {"optim.lr", "peft.r"} <= set(rows[0])  # the searched keys, even if both trials drew the same rank
