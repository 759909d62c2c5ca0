"""A preemption signal to `trainer train` while its 2-rank job starts up (torchrun or the workers importing, loading
the model), before step 1: the outcome is the documented one every time (docs/checkpoints.md, "At any moment"), not
a race. The launcher has already handed the request on (its request file waits for the workers), so the workers
train to the first step boundary, save it and stop: exit 85, one `trainer:` line, no traceback, nothing left
running, step 1 committed; and the same command then resumes from it and completes.

About 1 minute per case on a shared 2-core box (two 2-rank launches, each mostly start-up).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses, worker_pids
from tests.distributed.test_launcher_signals import ARGS
from tests.signals import agent_pid, assert_none_left, processes_of, start

pytestmark = pytest.mark.distributed

# The same command twice (the relaunch must resume, not refuse a change); a short run keeps the relaunch cheap.
COMMAND = (*ARGS, "train.max_steps=3")
ENV = {"OMP_NUM_THREADS": "1"}


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def _trained_steps(run_dir: Path) -> list[int]:
    metrics = run_dir / "metrics.jsonl"
    return [int(line.split('"step": ')[1].split(",")[0]) for line in
            (metrics.read_text().splitlines() if metrics.exists() else []) if '"loss"' in line]


def _wait_for(moment: str, run_dir: Path, job) -> None:
    """`torchrun`: the agent exists, no worker yet; `workers`: both workers exist (importing torch)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and job.poll() is None:
        workers = worker_pids(run_dir)
        if moment == "workers" and len(workers) == 2:
            return
        if moment == "torchrun" and any("launch.agent" in c for c in processes_of(run_dir).values()):
            assert not workers, f"the workers started before the agent was seen: {processes_of(run_dir)}"
            return
        time.sleep(0.02)
    raise AssertionError(f"no {moment} moment (exit code {job.poll()}): {processes_of(run_dir)}")


@pytest.mark.parametrize("moment, sig", [("workers", signal.SIGTERM),
                                         pytest.param("workers", signal.SIGINT, marks=pytest.mark.extended),
                                         pytest.param("torchrun", signal.SIGUSR1, marks=pytest.mark.extended)],
                         ids=lambda value: value.name if isinstance(value, signal.Signals) else value)
def test_a_signal_to_the_launcher_during_worker_start_up_saves_step_1_and_exits_85(moment, sig, tmp_path):
    run_dir = tmp_path / "run"
    job = start(["train", f"run.dir={run_dir}", *COMMAND], tmp_path / "out.log", env=ENV)
    try:
        _wait_for(moment, run_dir, job)
        assert not _trained_steps(run_dir), "step 1 came before the signal: not a start-up moment"
        agent = agent_pid(run_dir, timeout=5)
        job.send_signal(sig)
    except BaseException:
        for pid in processes_of(run_dir):  # a failed check leaves nothing running
            os.kill(pid, signal.SIGKILL)
        raise
    _, stderr = job.communicate(timeout=600)
    output = (tmp_path / "out.log").read_text() + stderr
    assert_none_left(run_dir)
    assert agent not in processes_of(run_dir)
    assert job.returncode == 85, output[-3000:]
    assert "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("trainer:")]
    assert len(lines) == 1 and lines[0] == stderr.strip().splitlines()[-1], stderr[-3000:]
    assert lines[0].startswith("trainer: preempted at step 1") and "run the same command again" in lines[0], lines
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["steps"] == 1, summary
    assert _committed(run_dir) == [1] and _trained_steps(run_dir) == [1]

    again = run_cli("train", f"run.dir={run_dir}", *COMMAND, env=ENV, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resumed from" in again.stderr and "step-000001 at step 1" in again.stderr, again.stderr[-3000:]
    assert read_summary(run_dir)["status"] == "completed" and read_summary(run_dir)["steps"] == 3
    assert sorted(train_losses(run_dir)) == [1, 2, 3] and (run_dir / "final").is_dir()
    assert_none_left(run_dir)
