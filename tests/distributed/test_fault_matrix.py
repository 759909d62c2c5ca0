"""The fault matrix: a run is signalled or killed at random moments, in random places (the `trainer` launcher,
torchrun, one rank), and relaunched with the same command until it completes. Whatever happened, the final losses
are the uninterrupted run's bit for bit (fp32) and no process of the run survives any interruption.

Random but reproducible: FAULT_SEED picks the faults (set $FAULT_SEED to explore others). Time: about 4 minutes on
a shared 2-core box (one reference and three interrupted runs per strategy, each a few seconds of training).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses, worker_pids
from tests.signals import agent_pid, assert_none_left, start

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAULT_SEED = int(os.environ.get("FAULT_SEED", "14"))
MAX_STEPS = 10
COMMON = (f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8",
          "eval.max_batches=1", "eval.generate_samples=0", "eval.every_n_steps=4", "logger.progress=false",
          "logger.plot=false", "train.precision=fp32", "checkpoint.every_n_steps=3", "checkpoint.keep_last=2")
SHAPES = {"single": ("strategy=single",), "ddp": ("strategy=ddp", "launcher.nproc_per_node=2")}
FAULTS = {"single": [("launcher", signal.SIGTERM), ("launcher", signal.SIGINT), ("launcher", signal.SIGKILL),
                     ("launcher", signal.SIGUSR1)],
          "ddp": [("launcher", signal.SIGTERM), ("launcher", signal.SIGKILL), ("torchrun", signal.SIGKILL),
                  ("torchrun", signal.SIGUSR1), ("rank", signal.SIGUSR1), ("rank", signal.SIGKILL)]}
ENV = {"OMP_NUM_THREADS": "1"}


def _logged_steps(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return metrics.read_text().count('"loss"') if metrics.exists() else 0


def _interrupt(run_dir: Path, shape: str, fault: tuple, after_s: float, log: Path) -> int | None:
    """Start the run, deliver the fault `after_s` seconds after its first logged step of this launch (or at once
    if it finishes first), and wait for everything to end; the launcher's exit code."""
    target, sig = fault
    job = start(["train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape]], log, env=ENV)
    before = _logged_steps(run_dir)
    while job.poll() is None and _logged_steps(run_dir) <= before:
        time.sleep(0.05)
    time.sleep(after_s)
    if job.poll() is None:
        pid = {"launcher": lambda: job.pid, "torchrun": lambda: agent_pid(run_dir, timeout=5),
               "rank": lambda: random.Random(after_s).choice(worker_pids(run_dir))}[target]()
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass  # it ended meanwhile
    job.communicate(timeout=900)
    assert_none_left(run_dir)
    return job.returncode


# `make test` runs the 2-rank shape (its faults include every single-process one); `make test-all` both.
@pytest.mark.parametrize("shape", [pytest.param(s, marks=[pytest.mark.extended] if s == "single" else [])
                                   for s in sorted(SHAPES)])
def test_random_faults_then_resume_give_the_uninterrupted_losses(shape, tmp_path):
    reference = tmp_path / "reference"
    done = run_cli("train", f"run.dir={reference}", *COMMON, *SHAPES[shape], env=ENV, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = train_losses(reference)
    rng = random.Random(f"{FAULT_SEED}-{shape}")
    run_dir, history = tmp_path / "faulted", []
    for attempt in range(3):
        fault, after_s = rng.choice(FAULTS[shape]), round(rng.uniform(0.0, 2.0), 2)
        code = _interrupt(run_dir, shape, fault, after_s, tmp_path / f"attempt{attempt}.log")
        history.append((fault[0], fault[1].name, after_s, code))
        if fault[1] != signal.SIGKILL and fault[0] != "rank" and code not in (0, None):
            assert code == 85, (history, (tmp_path / f"attempt{attempt}.log").read_text()[-3000:])
    final = run_cli("train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape], env=ENV, timeout=900)
    assert final.returncode == 0, (history, final.stderr[-3000:])
    assert read_summary(run_dir)["status"] == "completed", history
    losses = train_losses(run_dir)  # a step run twice: the later record counts
    assert {step: losses[step] for step in expected} == expected, history
