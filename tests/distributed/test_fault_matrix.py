"""The fault matrix: a run is signalled or killed at random moments, in random places (the `trainer` launcher,
torchrun, one rank), and relaunched with the same command until it completes. Whatever happened, the final losses
are the uninterrupted run's bit for bit (fp32) and no process of the run survives any interruption.

Every try must count: its fault reaches the run while it trains and cuts it short (the try ends without completing,
with the fault's exit code: 85 for a preemption request, -9 for a SIGKILLed launcher, a worker failure for a
SIGKILLed rank), and each relaunch resumes from the newest committed checkpoint the tries before it left (the first
try's fault always leaves one, so later tries resume). A try's fault comes at a random moment after its launch's
first step, but no later than a step chosen to leave the later tries room to be cut short as well.

Random but reproducible: FAULT_SEED picks the faults (set $FAULT_SEED to explore others). Time: about 4 minutes on
a shared 2-core box (one reference and three interrupted runs per strategy, each a few seconds of training).
The extended cases deliver one fault at a named moment instead (start-up, an evaluation, the final save).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses, worker_pids
from tests.signals import agent_pid, assert_none_left, processes_of, start

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

FAULT_SEED = int(os.environ.get("FAULT_SEED", "14"))
MAX_STEPS = 16
COMMON = (f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=2", "train.global_batch_size=8",
          "eval.max_batches=1", "eval.generate_samples=0", "eval.every_n_steps=4", "logger.progress=false",
          "logger.plot=false", "train.precision=fp32", "checkpoint.every_n_steps=3", "checkpoint.keep_last=2")
SHAPES = {"single": ("strategy=single",), "ddp": ("strategy=ddp", "launcher.nproc_per_node=2")}
FAULTS = {"single": [("launcher", signal.SIGTERM), ("launcher", signal.SIGINT), ("launcher", signal.SIGKILL),
                     ("launcher", signal.SIGUSR1)],
          "ddp": [("launcher", signal.SIGTERM), ("launcher", signal.SIGKILL), ("torchrun", signal.SIGKILL),
                  ("torchrun", signal.SIGUSR1), ("rank", signal.SIGUSR1), ("rank", signal.SIGKILL)]}
TRIES = 3
# Steps that may pass between a fault and the step boundary the run stops at: a request to the launcher or torchrun
# reaches the workers through a file they look at once a second (trainer/preemption.py), then the step in progress
# finishes (~0.4-0.6 s a step here).
LATENCY_STEPS = 4
ENV = {"OMP_NUM_THREADS": "1"}


def _logged_steps(run_dir: Path) -> list[int]:
    """The steps of metrics.jsonl's training records (a step run twice appears twice), tolerating a cut line."""
    metrics = run_dir / "metrics.jsonl"
    text = metrics.read_text() if metrics.exists() else ""
    return [int(line.split('"step": ')[1].split(",")[0]) for line in text.splitlines()
            if '"loss"' in line and '"step": ' in line and line.endswith("}")]


def _newest_committed(run_dir: Path) -> int:
    steps = [int(p.parent.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*/COMMITTED")]
    return max(steps, default=0)


def _interrupt(run_dir: Path, shape: str, fault: tuple, after_s: float, latest_step: int,
               log: Path) -> tuple[int, str, int]:
    """Start the run, deliver the fault `after_s` seconds after its first logged step of this launch, or once step
    `latest_step` is logged if that comes first, and wait for everything to end: (the launcher's exit code, its
    output, the newest step logged when the fault was sent). Fails if the run ended before its fault."""
    target, sig = fault
    job = start(["train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape]], log, env=ENV)
    before = len(_logged_steps(run_dir))
    while job.poll() is None and len(_logged_steps(run_dir)) <= before:
        time.sleep(0.05)
    deadline = time.monotonic() + after_s
    while job.poll() is None and time.monotonic() < deadline and max(_logged_steps(run_dir)) < latest_step:
        time.sleep(0.02)
    at_step = max(_logged_steps(run_dir), default=0)
    delivered = False
    if job.poll() is None:
        pid = {"launcher": lambda: job.pid, "torchrun": lambda: agent_pid(run_dir, timeout=5),
               "rank": lambda: random.Random(after_s).choice(worker_pids(run_dir))}[target]()
        try:
            os.kill(pid, sig)
            delivered = True
        except ProcessLookupError:
            pass  # it ended meanwhile: reported below
    _, stderr = job.communicate(timeout=900)
    assert_none_left(run_dir)
    output = log.read_text() + stderr
    assert delivered, f"the run ended (exit {job.returncode}) before its fault {fault} came:\n{output[-3000:]}"
    return job.returncode, output, at_step


def _assert_cut_short(run_dir: Path, fault: tuple, code: int, output: str, history: list) -> None:
    """The try ended before max_steps with the outcome its fault promises."""
    target, sig = fault
    context = (history, output[-3000:])
    assert not (run_dir / "final").exists(), context
    assert "Traceback" not in output and "ChildFailedError" not in output, context
    if (target, sig) == ("rank", signal.SIGKILL):
        # The rank died without a save; its peer fails, the launcher reports the silent rank as the cause.
        assert code not in (0, 85, None) and code > 0, context
        last = output.strip().splitlines()[-1]
        assert last.startswith("trainer: ") and "was killed or crashed without reporting" in last, context
        assert max(_logged_steps(run_dir), default=0) < MAX_STEPS, context
        return
    # Everything else is a preemption request (SIGKILL to the launcher or torchrun reaches the workers as the
    # kernel's SIGTERM): the workers checkpoint the step they stop at.
    assert code == (-signal.SIGKILL if target == "launcher" and sig == signal.SIGKILL else 85), context
    summary = read_summary(run_dir)
    assert summary["status"] == "preempted" and summary["steps"] < MAX_STEPS, (summary, *context)
    assert _newest_committed(run_dir) == summary["steps"], (summary, *context)
    if code == 85:
        last = output.strip().splitlines()[-1]
        assert last.startswith("trainer: preempted at step"), context


def _resumed_from(output: str, step: int) -> bool:
    return f"step-{step:06d} at step {step}" in output and "resumed from" in output


@pytest.fixture(scope="module")
def reference_losses(tmp_path_factory):
    """shape -> the uninterrupted run's losses, run once per shape for the module's tests."""
    cache = {}

    def losses(shape: str) -> dict[int, float]:
        if shape not in cache:
            reference = tmp_path_factory.mktemp(f"reference-{shape}")
            done = run_cli("train", f"run.dir={reference}", *COMMON, *SHAPES[shape], env=ENV, timeout=900)
            assert done.returncode == 0, done.stderr[-3000:]
            cache[shape] = train_losses(reference)
        return cache[shape]
    return losses


# `make test` runs the 2-rank shape (its faults include every single-process one); `make test-all` both.
@pytest.mark.parametrize("shape", [pytest.param(s, marks=[pytest.mark.extended] if s == "single" else [])
                                   for s in sorted(SHAPES)])
def test_random_faults_then_resume_give_the_uninterrupted_losses(shape, tmp_path, reference_losses):
    expected = reference_losses(shape)
    rng = random.Random(f"{FAULT_SEED}-{shape}")
    run_dir, history, resumed = tmp_path / "faulted", [], 0
    for attempt in range(TRIES):
        # The first fault always checkpoints (not a rank's SIGKILL), so the later tries have something to resume.
        choices = [f for f in FAULTS[shape] if attempt or f != ("rank", signal.SIGKILL)]
        fault, after_s = rng.choice(choices), round(rng.uniform(0.0, 1.0), 2)
        start_step = _newest_committed(run_dir)
        # Leave each later try room to be cut short too: this one's fault comes by the step that splits the rest.
        latest_step = start_step + max(1, (MAX_STEPS - 1 - start_step) // (TRIES - attempt) - LATENCY_STEPS)
        code, output, at_step = _interrupt(run_dir, shape, fault, after_s, latest_step,
                                           tmp_path / f"attempt{attempt}.log")
        history.append((fault[0], fault[1].name, after_s, f"from {start_step}", f"sent at {at_step}",
                        f"stopped at {max(_logged_steps(run_dir), default=0)}", code))
        if start_step:
            assert _resumed_from(output, start_step), (history, output[-3000:])
            resumed += 1
        _assert_cut_short(run_dir, fault, code, output, history)
    assert resumed >= 1, history
    _finish_and_compare(run_dir, shape, expected, history)


def _finish_and_compare(run_dir: Path, shape: str, expected: dict, history) -> None:
    """Relaunch the same command: it resumes from the newest committed checkpoint and completes, and every step's
    loss is the uninterrupted run's (a step run twice: the later record counts)."""
    start_step = _newest_committed(run_dir)
    final = run_cli("train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape], env=ENV, timeout=900)
    assert final.returncode == 0, (history, final.stderr[-3000:])
    assert _resumed_from(final.stderr, start_step), (history, final.stderr[-3000:])
    assert read_summary(run_dir)["status"] == "completed", history
    assert_none_left(run_dir)
    losses = train_losses(run_dir)
    assert {step: losses[step] for step in expected} == expected, history


# Moments a random fault rarely or never hits, one fault each (2 ranks): the start-up before step 1 (torchrun
# SIGKILLed: the kernel SIGTERMs the workers), an evaluation in the middle, the evaluation after the last step, and
# the final save (trainer/faults.py: every rank signals itself when it gets there). (moment, signal, exit code, step
# the run stops at, what the log says.)
MOMENTS = [("start-up", "SIGKILL", 85, 1, "trainer: preempted at step 1"),
           ("eval-4", "SIGTERM", 85, 4, "SIGTERM: evaluation at step 4 stopped"),
           (f"eval-{MAX_STEPS}", "SIGUSR1", 85, MAX_STEPS, f"SIGUSR1: evaluation at step {MAX_STEPS} stopped"),
           ("final-save", "SIGTERM", 0, MAX_STEPS, "SIGTERM during the final save: the run is complete")]
# torchrun hosts the store the workers form their group through: killed before the group exists, the workers stop
# with nothing to save (trainer/worker.py), which is the other documented outcome of a start-up fault.
NOTHING_TO_SAVE = "stopped before training started, nothing to save; run the same command again"


@pytest.mark.extended
@pytest.mark.parametrize("moment, sig, code, stop_step, says", MOMENTS, ids=[m[0] for m in MOMENTS])
def test_a_fault_at_a_named_moment_then_resume_gives_the_uninterrupted_losses(moment, sig, code, stop_step, says,
                                                                             tmp_path, reference_losses):
    shape, run_dir, log = "ddp", tmp_path / "run", tmp_path / "out.log"
    env = ENV if moment == "start-up" else {**ENV, "TRAINER_SIGNAL_AT": f"{moment}:{sig}"}
    job = start(["train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape]], log, env=env)
    if moment == "start-up":
        try:
            deadline = time.monotonic() + 300
            while len(worker_pids(run_dir)) < 2 and job.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            assert not _logged_steps(run_dir), "step 1 came before the fault: not a start-up moment"
            os.kill(agent_pid(run_dir, timeout=5), signal.Signals[sig])
        except BaseException:
            for pid in processes_of(run_dir):  # a failed check leaves nothing running
                os.kill(pid, signal.SIGKILL)
            raise
    _, stderr = job.communicate(timeout=900)
    output = log.read_text() + stderr
    assert_none_left(run_dir)
    assert job.returncode == code, output[-3000:]
    if moment == "start-up" and NOTHING_TO_SAVE in output:
        assert "Traceback" not in output and not _logged_steps(run_dir), output[-3000:]
        assert stderr.strip().splitlines()[-1].endswith(NOTHING_TO_SAVE), stderr[-3000:]
        final = run_cli("train", f"run.dir={run_dir}", *COMMON, *SHAPES[shape], env=ENV, timeout=900)
        assert final.returncode == 0 and train_losses(run_dir) == reference_losses(shape), final.stderr[-3000:]
        return
    assert says in output and "Traceback" not in output and "ChildFailedError" not in output, output[-3000:]
    summary = read_summary(run_dir)
    assert summary["steps"] == stop_step, summary
    assert summary["status"] == ("completed" if code == 0 else "preempted"), summary
    if code == 0:  # nothing to resume: the run is complete
        assert (run_dir / "final").is_dir()
        assert train_losses(run_dir) == reference_losses(shape)
        return
    assert len([line for line in stderr.splitlines() if line.startswith("trainer:")]) == 1, stderr[-3000:]
    assert _newest_committed(run_dir) == stop_step and not (run_dir / "final").exists()
    _finish_and_compare(run_dir, shape, reference_losses(shape), [moment])
