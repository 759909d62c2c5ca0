"""Helpers for tests that run `trainer train launcher=slurm` on the dev cluster and follow the job it submits."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.conftest import REPO

if TYPE_CHECKING:
    from tests.slurm.conftest import SlurmCluster

JOB_TIMEOUT_S = 300
ENDED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"})


def trainer(cluster: SlurmCluster, *args: str, wandb: str = "disabled", **popen) -> subprocess.Popen:
    """`trainer ARGS` against this cluster (its SLURM_CONF, no job variables inherited from outside)."""
    env = cluster.env(PYTHONUNBUFFERED="1", WANDB_MODE=wandb)
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def submit(cluster: SlurmCluster, *args: str) -> tuple[list[int], str]:
    """`trainer train ARGS`: the ids of the jobs it submitted, and its output."""
    proc = trainer(cluster, "train", *args)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, out + err
    return [int(n) for n in re.findall(r"^Submitted batch job (\d+)$", out, re.MULTILINE)], out


def wait_for(predicate, what: str, timeout: float, poll: float = 0.2, job: tuple | None = None):
    """Poll until `predicate()` is truthy. With job=(cluster, job_id, run_dir), fail at once if the job ends first."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if job is not None:
            cluster, job_id, run_dir = job
            state = cluster.job(job_id).get("JobState")
            if state in ENDED_STATES:
                pytest.fail(f"job {job_id} ended {state} before {what}:\n{job_log(run_dir, job_id)[-4000:]}")
        if time.monotonic() > deadline:
            log = job_log(run_dir, job_id)[-4000:] if job is not None else ""
            pytest.fail(f"{what} did not happen within {timeout:.0f} s\n{log}")
        time.sleep(poll)


def logged_steps(run_dir: Path) -> list[int]:
    """The steps of every train record in metrics.jsonl, in order (a resumed run logs its redone steps again)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip().endswith("}")]
    return [r["step"] for r in records if "loss" in r]


def job_log(run_dir: Path, job_id: int) -> str:
    """The job's log (every run of a requeued job appends to it); empty before the job has started."""
    path = run_dir / f"slurm-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else ""
