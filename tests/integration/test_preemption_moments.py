"""A preemption signal at any moment of a one-process run ends in exit 85 with the newest state committed (or
nothing lost before step 1), never in a killed process; a signal during the final save lets the run complete.

Real signals: to the launcher from outside, or (for moments too short to hit from outside: an evaluation, the
final save) sent by the process to itself at that moment through trainer/faults.py. Time: about 3 minutes on a
shared 2-core box.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses
from tests.signals import assert_none_left, start, wait_for_step

ARGS = ("train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
        "eval.generate_samples=2", "eval.max_new_tokens=2", "eval.every_n_steps=2", "logger.progress=false",
        "logger.plot=false")
ENV = {"OMP_NUM_THREADS": "1"}


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


@pytest.mark.parametrize("moment, stop_step", [("eval-0", 1), ("eval-2", 2), ("eval-4", 4)])
def test_a_signal_during_an_evaluation_stops_it_saves_and_exits_85(moment, stop_step, tmp_path):
    """The baseline eval: the run still trains step 1 (every requeued run makes progress); a mid-run eval: stopped,
    step 2 saved; the eval after the last step: stopped, the trained state saved, and the resume finishes the run."""
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *ARGS, env={**ENV, "TRAINER_SIGNAL_AT": f"{moment}:SIGTERM"})
    assert result.returncode == 85, result.stdout[-2000:] + result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert f"SIGTERM: evaluation at step {moment[5:]} stopped" in result.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["steps"] == stop_step, summary
    assert _committed(run_dir)[-1] == stop_step
    resumed = run_cli("train", f"run.dir={run_dir}", *ARGS, env=ENV)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_summary(run_dir)["status"] == "completed" and (run_dir / "final").is_dir()
    assert sorted(train_losses(run_dir)) == [1, 2, 3, 4]


def test_a_signal_during_the_final_save_lets_the_run_complete(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *ARGS, env={**ENV, "TRAINER_SIGNAL_AT": "final-save:SIGUSR1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SIGUSR1 during the final save: the run is complete" in result.stderr
    assert read_summary(run_dir)["status"] == "completed"
    assert any((run_dir / "final").glob("*.safetensors"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_ctrl_c_or_sigusr1_to_the_launcher_mid_training_checkpoints_and_exits_85(sig, tmp_path):
    run_dir = tmp_path / "run"
    job = start(["train", f"run.dir={run_dir}", *ARGS, "train.max_steps=40"], tmp_path / "out.log", env=ENV)
    wait_for_step(run_dir, 1, job)
    job.send_signal(sig)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 85, stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and _committed(run_dir)[-1] == summary["steps"] < 40
    assert "run preempted at step" in (tmp_path / "out.log").read_text()
    assert_none_left(run_dir)


def test_a_signal_while_the_launcher_starts_up_exits_85_and_loses_nothing(tmp_path):
    """Before anything trained: nothing to save, and the run dir holds no trained state (or, when the signal came
    after training began, the first step's checkpoint)."""
    run_dir = tmp_path / "run"
    job = start(["train", f"run.dir={run_dir}", *ARGS], tmp_path / "out.log", env=ENV)
    time.sleep(1.5)  # the Python process is up (the handler is the first thing `trainer train` installs)
    job.send_signal(signal.SIGTERM)
    _, stderr = job.communicate(timeout=600)
    assert job.returncode == 85, stderr[-3000:]
    assert "Traceback" not in stderr
    if (run_dir / "summary.json").exists():
        assert read_summary(run_dir)["steps"] == 1 and _committed(run_dir) == [1]
    else:
        assert "before training started" in stderr and len(stderr.strip().splitlines()) == 1, stderr
        assert not (run_dir / "checkpoints").exists()
