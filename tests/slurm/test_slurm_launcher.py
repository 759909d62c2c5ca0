"""`trainer train launcher=slurm` on the real dev cluster: multi-node training, preemption -> requeue -> resume,
and a grid sweep of Slurm jobs.

Each job trains the embedded tiny model with gloo on the two emulated nodes. Timings (submit -> first step,
signal -> requeued job running) are printed; run with `-s` to see them.
"""

from __future__ import annotations

import re
import time
from typing import TYPE_CHECKING

import pytest

from tests.conftest import read_summary, train_losses
from tests.slurm.jobs import JOB_TIMEOUT_S, job_log, logged_steps, submit, trainer, wait_for

if TYPE_CHECKING:
    from conftest import SlurmCluster

pytestmark = pytest.mark.slurm

MAX_STEPS = 12  # long enough to be mid-run when signalled, short enough to finish in well under a minute
# 2 nodes x 1 gloo worker; no dropout and no periodic checkpoints, so only the preemption saves one.
TWO_NODES = ("launcher=slurm", "launcher.nodes=2", "launcher.time=10", "launcher.signal_grace_s=60", "strategy=ddp",
             "peft.dropout=0", f"train.max_steps={MAX_STEPS}", "train.micro_batch_size=4",
             "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false",
             "logger.plot=false", "checkpoint.every_n_steps=0")
@pytest.fixture(scope="module")
def two_node_run(slurm_cluster: SlurmCluster, tmp_path_factory) -> dict:
    """One uninterrupted 2-node job: the first test checks it, the preemption test compares against it."""
    run_dir = tmp_path_factory.mktemp("two-nodes") / "run"
    submitted = time.time()
    job_ids, out = submit(slurm_cluster, *TWO_NODES, f"run.dir={run_dir}")
    first_step = wait_for(lambda: logged_steps(run_dir) and time.time(), "the first step", JOB_TIMEOUT_S,
                          job=(slurm_cluster, job_ids[0], run_dir))
    info = slurm_cluster.wait_for_job(job_ids[0], timeout=JOB_TIMEOUT_S)
    print(f"\n2-node job: submit -> first step {first_step - submitted:.1f} s, "
          f"submit -> finished {time.time() - submitted:.1f} s")
    return {"run_dir": run_dir, "job_ids": job_ids, "out": out, "info": info}


def test_two_node_job_trains_the_embedded_model_to_completion(two_node_run, slurm_cluster):
    run_dir, info = two_node_run["run_dir"], two_node_run["info"]
    assert len(two_node_run["job_ids"]) == 1 and f"run dir: {run_dir}" in two_node_run["out"]
    log = job_log(run_dir, two_node_run["job_ids"][0])
    assert info["JobState"] == "COMPLETED", f"{info}\n{log}"
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS
    assert summary["world_size"] == 2  # nodes x nproc_per_node
    assert summary["train_loss_last"] < summary["train_loss_first"]
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    # The script, the frozen config (absolute run dir) and the job's log all live in the run dir.
    assert (run_dir / "train.sbatch").is_file() and f"dir: {run_dir}" in (run_dir / "config.yaml").read_text()
    # One task per node; the rendezvous host is the allocation's first node.
    assert re.search(r"on \S+: 2 node\(s\) x 1 worker\(s\); rendezvous (\S+):", log).group(1) in slurm_cluster.nodes


def test_preempted_job_checkpoints_requeues_itself_and_ends_with_the_uninterrupted_loss(
        two_node_run, slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    # launcher.wait: `trainer train` follows the job through its requeue, as an Optuna trial does.
    proc = trainer(slurm_cluster, "train", *TWO_NODES, f"run.dir={run_dir}", "launcher.wait=true",
                   "logger.wandb.mode=offline", wandb="offline")
    job_id = int(wait_for(lambda: (run_dir / "slurm_job_id").is_file() and (run_dir / "slurm_job_id").read_text(),
                          "the submission", 120))
    wait_for(lambda: logged_steps(run_dir), "the first step", JOB_TIMEOUT_S, job=(slurm_cluster, job_id, run_dir))
    wandb_id = (run_dir / "wandb_run_id").read_text()

    signalled = time.time()
    slurm_cluster.run(["scancel", "--batch", "--signal=USR1", str(job_id)])
    wait_for(lambda: slurm_cluster.job(job_id).get("Restarts") == "1" and
             slurm_cluster.job(job_id).get("JobState") == "RUNNING", "the requeued job's start", 120,
             job=(slurm_cluster, job_id, run_dir))
    restarted = time.time()
    stopped_at = len(logged_steps(run_dir))
    wait_for(lambda: len(logged_steps(run_dir)) > stopped_at, "the first step after the requeue", JOB_TIMEOUT_S,
             job=(slurm_cluster, job_id, run_dir))
    resumed_step = time.time()
    out, err = proc.communicate(timeout=JOB_TIMEOUT_S)
    log = job_log(run_dir, job_id)
    assert proc.returncode == 0, f"{out}\n{err}\n{log}"
    print(f"\nUSR1 -> requeued job running: {restarted - signalled:.1f} s; "
          f"USR1 -> first step after resuming: {resumed_step - signalled:.1f} s")

    info = slurm_cluster.job(job_id)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) >= 1, info
    assert "got SIGUSR1" in log and "requeueing (restart 1 of at most 3)" in log, log
    stop = re.search(r"SIGUSR1: stopping at step (\d+)", log)
    assert stop and 1 <= int(stop.group(1)) < MAX_STEPS, log
    preempted_step = int(stop.group(1))
    # Only the preemption saved a checkpoint (checkpoint.every_n_steps=0), and the requeued run resumed from it.
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [f"step-{preempted_step:06d}"]
    assert f"resumed from {run_dir}/checkpoints/step-{preempted_step:06d}" in log
    assert f"job {job_id}, restart 1," in log

    summary, reference = read_summary(run_dir), read_summary(two_node_run["run_dir"])
    assert summary["status"] == "completed" and summary["steps"] == MAX_STEPS
    assert summary["train_loss_last"] == pytest.approx(reference["train_loss_last"], rel=1e-6)
    assert summary["eval_after"]["loss"] == pytest.approx(reference["eval_after"]["loss"], rel=1e-6)
    reference_losses, losses = train_losses(two_node_run["run_dir"]), train_losses(run_dir)
    for step in range(preempted_step + 1, MAX_STEPS + 1):
        assert losses[step] == pytest.approx(reference_losses[step], rel=1e-6), f"step {step}"
    # The same W&B run: the id kept in the run dir, and every offline run dir W&B wrote carries it.
    assert (run_dir / "wandb_run_id").read_text() == wandb_id
    wandb_runs = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(wandb_runs) >= 2 and all(name.endswith(f"-{wandb_id}") for name in wandb_runs), wandb_runs


def test_grid_sweep_runs_each_point_as_a_slurm_job_and_tabulates_them(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    job_ids, out = submit(slurm_cluster, "-m", "launcher=slurm", "launcher.time=10", "optim.lr=1e-3,3e-3",
                          "peft.r=4,8", f"hydra.sweep.dir={sweep_dir}", "train.max_steps=2",
                          "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
                          "eval.generate_samples=0", "logger.progress=false", "logger.plot=false")
    assert len(set(job_ids)) == 4, out
    assert "when they have finished: trainer sweep summary" in out  # the jobs are queued, not done
    for job_id in job_ids:
        info = slurm_cluster.wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
        assert info["JobState"] == "COMPLETED", info

    proc = trainer(slurm_cluster, "sweep", "summary", str(sweep_dir))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr
    rows = (sweep_dir / "sweep_summary.csv").read_text().splitlines()
    header, points = rows[0].split(","), [row.split(",") for row in rows[1:]]
    assert header[:3] == ["run", "optim.lr", "peft.r"] and header[-1] == "best"
    assert sorted((p[1], p[2]) for p in points) == [("0.001", "4"), ("0.001", "8"), ("0.003", "4"), ("0.003", "8")]
    assert all(p[header.index("status")] == "completed" for p in points)
    eval_losses = [float(p[header.index("eval_loss")]) for p in points]
    best = [p for p in points if p[-1] == "best"]
    assert len(best) == 1 and float(best[0][header.index("eval_loss")]) == min(eval_losses)
    assert "| **best** |" in (sweep_dir / "sweep_summary.md").read_text() and "| **best** |" in stdout
    # Each point ran in its own sweep subdir, and all of them log to one W&B group.
    for point in points:
        config = (sweep_dir / point[0] / "config.yaml").read_text()
        assert f"dir: {sweep_dir / point[0]}" in config and "group: sweep" in config


def test_a_dpo_sweep_runs_each_point_as_a_slurm_job_on_two_nodes(slurm_cluster, tmp_path):
    """Preference tuning takes the same Slurm and sweep path as SFT: a beta grid of DPO jobs, each on two nodes
    (pairs kept whole across the ranks), each recording its reference log-probs and logging preference metrics."""
    sweep_dir = tmp_path / "sweep"
    job_ids, out = submit(slurm_cluster, "-m", "experiment=demo-dpo", "objective.beta=0.1,0.5", "launcher=slurm",
                          "launcher.nodes=2", "launcher.time=10", "strategy=ddp", "peft.dropout=0",
                          f"hydra.sweep.dir={sweep_dir}", "train.max_steps=2", "train.micro_batch_size=4",
                          "train.global_batch_size=8", "eval.max_batches=1", "logger.progress=false",
                          "logger.plot=false")
    assert len(set(job_ids)) == 2, out
    for job_id in job_ids:
        info = slurm_cluster.wait_for_job(job_id, timeout=JOB_TIMEOUT_S)
        assert info["JobState"] == "COMPLETED", info
    for point, beta in (("0", 0.1), ("1", 0.5)):
        run_dir = sweep_dir / point
        summary = read_summary(run_dir)
        assert summary["status"] == "completed" and summary["world_size"] == 2
        assert f"beta: {beta}" in (run_dir / "config.yaml").read_text()
        assert (run_dir / "reference_logps.safetensors").is_file()
        assert 0 <= summary["eval_after"]["preference_accuracy"] <= 1
        assert train_losses(run_dir)[1] == pytest.approx(0.6931472, rel=1e-4)  # DPO at zero log-ratio
    proc = trainer(slurm_cluster, "sweep", "summary", str(sweep_dir))
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "| **best** |" in stdout, stderr
