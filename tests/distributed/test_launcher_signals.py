"""Signals to `trainer train` or to its torchrun on a 2-rank run: the workers always checkpoint and stop, nothing
outlives the job, and the launcher (while alive) exits 85 with one line, without torchrun's traceback.

About 1 minute per case on a shared 2-core box (each is a 2-rank gloo run stopped after a step or two).
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import read_summary, worker_pids
from tests.signals import agent_pid, assert_none_left, processes_of, start, wait_for_step

pytestmark = pytest.mark.distributed

ARGS = ("strategy=ddp", "launcher.nproc_per_node=2", "train.max_steps=40", "train.micro_batch_size=4",
        "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false",
        "logger.plot=false")


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


_EXTENDED = pytest.mark.extended  # `make test-all`: the same paths with the other signal
@pytest.mark.parametrize("target, sig", [("launcher", signal.SIGTERM), pytest.param("launcher", signal.SIGUSR1,
                                                                                    marks=_EXTENDED),
                                         ("launcher", signal.SIGKILL),
                                         pytest.param("torchrun", signal.SIGKILL, marks=_EXTENDED),
                                         ("torchrun", signal.SIGUSR1)],
                         ids=lambda value: value.name if isinstance(value, signal.Signals) else value)
def test_workers_checkpoint_and_stop_and_nothing_survives(target, sig, tmp_path):
    run_dir = tmp_path / "run"
    job = start(["train", f"run.dir={run_dir}", *ARGS], tmp_path / "out.log")
    wait_for_step(run_dir, 1, job)
    pid = job.pid if target == "launcher" else agent_pid(run_dir)
    os.kill(pid, sig)
    _, stderr = job.communicate(timeout=600)
    assert_none_left(run_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and _committed(run_dir)[-1] == summary["steps"] < 40, summary
    assert "Traceback" not in stderr and "ChildFailedError" not in stderr, stderr[-3000:]
    if target == "launcher" and sig == signal.SIGKILL:
        assert job.returncode == -signal.SIGKILL
        return
    assert job.returncode == 85, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: preempted at step") and "run the same command again" in last, stderr[-2000:]
    assert not processes_of(run_dir)


def test_a_relaunch_right_after_the_launcher_was_killed_waits_for_its_workers(tmp_path):
    """SIGKILL frees the run dir's lock at once while the workers still save: the next `trainer train` takes the lock
    and must wait for them, not start a second set beside them (a stopped worker holds them all back, so the relaunch
    certainly comes while they live)."""
    run_dir = tmp_path / "run"
    job = start(["train", f"run.dir={run_dir}", *ARGS], tmp_path / "out.log")
    wait_for_step(run_dir, 1, job)
    workers = worker_pids(run_dir)
    assert len(workers) == 2, processes_of(run_dir)
    os.kill(workers[0], signal.SIGSTOP)
    try:
        job.kill()
        job.wait(timeout=60)
        relaunch = start(["train", f"run.dir={run_dir}", *ARGS, "train.max_steps=6"], tmp_path / "relaunch.log")
        deadline = time.monotonic() + 15  # past the relaunch's start-up, while the old workers cannot finish
        while time.monotonic() < deadline:
            time.sleep(0.5)
            now = set(worker_pids(run_dir))
            assert now <= set(workers), f"new workers {now - set(workers)} started beside the old ones"
            assert relaunch.poll() is None, relaunch.communicate()[1][-3000:]
    except BaseException:
        for pid in processes_of(run_dir):  # a failed check leaves nothing running
            os.kill(pid, signal.SIGKILL)
        raise
    finally:
        for pid in workers:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    _, stderr = relaunch.communicate(timeout=600)
    assert relaunch.returncode == 0, stderr[-3000:]
    assert "waiting for 2 workers of an earlier launcher on this run dir" in stderr, stderr[-3000:]
    assert_none_left(run_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 6, summary
    assert "resuming from" in stderr or "resumed from" in stderr, stderr[-3000:]
