"""Preemption, again and again: one job is signalled three times (`scancel --batch --signal=USR1`, as Slurm does
before a time limit) at three different moments -- while its workers are still starting, in the middle of
training, right after a checkpoint commit. Each time it must checkpoint, requeue itself and resume from that
checkpoint; in the end it completes with the loss of the same job run without interruption.

Both ways of placing two workers: one node running both, and two nodes running one each. Timings are printed;
run with `-s` to see them.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import read_summary, train_losses
from tests.slurm.jobs import JOB_TIMEOUT_S, job_log, logged_steps, submit, wait_for

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Room for three preemptions and steps after each. A request is answered a few steps after it is sent (Slurm's RPC,
# then the workers' once-a-second look at the request file), so the second run may stop several steps after the
# one it was signalled at, and the third run's first commit must still come before the last step: at 12 steps a
# CI run's second stop came at step 8 and the third run's first commit was the final one (step 12).
MAX_STEPS = 24
EVERY_N_STEPS = 4
PREEMPTIONS = 3  # launcher.max_requeues keeps its default, 3: the third requeue is the last one allowed
# No dropout (its random streams would differ after a resume on another node); one thread per worker, so two
# workers and a second job share the two cores without thrashing.
COMMON = ("launcher=slurm", "launcher.time=15", "launcher.signal_grace_s=60",
          'launcher.setup=["export OMP_NUM_THREADS=1"]', "strategy=ddp", "peft.dropout=0",
          f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8",
          f"checkpoint.every_n_steps={EVERY_N_STEPS}", "eval.max_batches=1", "eval.generate_samples=0",
          "logger.progress=false", "logger.plot=false")
SHAPES = {
    "1-node-x-2-workers": ("launcher.nodes=1", "launcher.nproc_per_node=2"),
    "2-nodes-x-1-worker": ("launcher.nodes=2", "launcher.nproc_per_node=1"),
}


def _preempt(cluster: SlurmCluster, job_id: int) -> float:
    cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    return time.monotonic()


def _wait_for_restart(job: tuple, restart: int) -> float:
    """Until the job's batch script runs again, for the given time (the job keeps its id across requeues)."""
    cluster, job_id, run_dir = job
    wait_for(lambda: f"job {job_id}, restart {restart}," in job_log(run_dir, job_id), f"requeue {restart}",
             JOB_TIMEOUT_S, job=job)
    return time.monotonic()


def _committed(run_dir: Path) -> set[str]:
    return {marker.parent.name for marker in (run_dir / "checkpoints").glob("step-*/COMMITTED")}


def _preempt_three_times(job: tuple) -> list[float]:
    """Signal the job at start-up, mid-training and right after a checkpoint commit; the latency of each requeue."""
    cluster, job_id, run_dir = job
    latencies = []
    # 1. During start-up: the batch script is running (it has logged its first line), no step has been trained.
    wait_for(lambda: f"job {job_id}, restart 0," in job_log(run_dir, job_id), "the batch script's start",
             JOB_TIMEOUT_S, job=job)
    signalled = _preempt(cluster, job_id)
    assert not logged_steps(run_dir), "the first preemption was meant to come before the first step"
    latencies.append(_wait_for_restart(job, 1) - signalled)
    # 2. Mid-training: as soon as the requeued run has trained a step of its own.
    trained = len(logged_steps(run_dir))
    wait_for(lambda: len(logged_steps(run_dir)) > trained, "a step after requeue 1", JOB_TIMEOUT_S, job=job)
    signalled = _preempt(cluster, job_id)
    latencies.append(_wait_for_restart(job, 2) - signalled)
    # 3. Right after a checkpoint commit: the first one that the third run writes.
    committed = _committed(run_dir)
    new = wait_for(lambda: _committed(run_dir) - committed, "a checkpoint commit after requeue 2", JOB_TIMEOUT_S,
                   job=job)
    assert f"step-{MAX_STEPS:06d}" not in new, (
        f"the second run stopped too late to leave the third one a commit before its last step:\n"
        f"{job_log(run_dir, job_id)[-3000:]}")
    signalled = _preempt(cluster, job_id)
    latencies.append(_wait_for_restart(job, 3) - signalled)
    return latencies


# `make test` preempts the two-node shape; two workers on one node requeue the same way (make test-all)
@pytest.mark.parametrize("shape", [pytest.param(shape, marks=[pytest.mark.extended] if shape == "1-node-x-2-workers"
                                                else []) for shape in sorted(SHAPES)])
def test_a_job_preempted_three_times_requeues_three_times_and_ends_with_the_uninterrupted_loss(
        shape, slurm_cluster, tmp_path):
    overrides = (*COMMON, *SHAPES[shape])
    reference_dir, run_dir = tmp_path / "uninterrupted", tmp_path / "preempted"
    started = time.monotonic()
    # The uninterrupted run trains beside the preempted one: each takes one CPU of a node, and the cluster has four.
    (reference_job,), _ = submit(slurm_cluster, *overrides, f"run.dir={reference_dir}")
    (job_id,), _ = submit(slurm_cluster, *overrides, f"run.dir={run_dir}")

    latencies = _preempt_three_times((slurm_cluster, job_id, run_dir))
    info = slurm_cluster.wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
    reference_info = slurm_cluster.wait_for_job(reference_job, timeout=JOB_TIMEOUT_S)
    print(f"\n{shape}: USR1 -> requeued run starting: {', '.join(f'{s:.1f} s' for s in latencies)}; "
          f"submit -> both jobs done: {time.monotonic() - started:.1f} s")

    log = job_log(run_dir, job_id)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == str(PREEMPTIONS), f"{info}\n{log}"
    assert reference_info["JobState"] == "COMPLETED", job_log(reference_dir, reference_job)
    for restart in range(1, PREEMPTIONS + 1):
        assert f"requeueing (restart {restart} of at most {PREEMPTIONS})" in log, log
    stops = [int(step) for step in re.findall(r"SIGUSR1: stopping at step (\d+)", log)]
    # The start-up request waits for the first step boundary; each run trains at least one step of its own.
    assert len(stops) == PREEMPTIONS and stops[0] == 1 and stops == sorted(set(stops)), log
    for step in stops:  # each run resumes from the checkpoint that the previous one saved as it stopped
        assert f"resumed from {run_dir}/checkpoints/step-{step:06d} at step {step}" in log, log

    summary, reference = read_summary(run_dir), read_summary(reference_dir)
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS
    assert summary["train_loss_last"] == pytest.approx(reference["train_loss_last"], rel=1e-6)
    assert summary["eval_after"]["loss"] == pytest.approx(reference["eval_after"]["loss"], rel=1e-6)
    losses, reference_losses = train_losses(run_dir), train_losses(reference_dir)
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))
    for step in losses:
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-6), f"step {step}"
