"""`launcher=slurm`: write the sbatch script into the run dir and submit it (or print it: launcher.dry_run).

The config is already validated and frozen in the (absolute) run dir; the job's workers read it from there, so
nothing here imports torch. With launcher.wait (and always for Optuna trials, whose value needs the finished
run) this process then follows the job through requeues until it ends, and answers with the run's result.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

from launch.slurm_script import LOG_PATTERN, SCRIPT_NAME, render_sbatch
from trainer.config.schema import Config
from trainer.errors import UserError

JOB_ID_FILE = "slurm_job_id"
_SUBMITTED = re.compile(r"Submitted batch job (\d+)")
POLL_S = 3.0
# Slurm states after which a job runs no more by itself (REQUEUED and PENDING come back).
FINISHED_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                             "BOOT_FAIL", "DEADLINE", "PREEMPTED", "SPECIAL_EXIT"})
SUCCESSFUL_STATUSES = ("completed", "early_stopped")


def write_script(config: Config) -> str:
    path = os.path.join(config.run.dir, SCRIPT_NAME)
    with open(path, "w") as fh:
        fh.write(render_sbatch(config))
    os.chmod(path, 0o755)
    return path


def submit(config: Config, wait: bool = False) -> int:
    """Submit the run's job; print sbatch's own line and the run dir. Returns 0, or the run's result when waiting."""
    script = write_script(config)
    if config.launcher.dry_run:
        with open(script) as fh:
            sys.stdout.write(fh.read())
        sys.stderr.write(f"[trainer] dry run: not submitted. Submit it with: sbatch {script}\n")
        return 0
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise UserError("launcher=slurm: `sbatch` is not on PATH; run this on a Slurm login node "
                        "(or set launcher.dry_run=true to only write the script)")
    result = subprocess.run([sbatch, script], capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        reason = result.stderr.strip().splitlines()[-1] if result.stderr.strip() else f"exit {result.returncode}"
        raise UserError(f"sbatch refused the job: {reason} (script: {script})")
    print(result.stdout.strip(), flush=True)  # sbatch's own "Submitted batch job N"
    print(f"run dir: {config.run.dir}", flush=True)
    match = _SUBMITTED.search(result.stdout)
    if match is None:
        raise UserError(f"sbatch printed no job id: {result.stdout.strip()!r}")
    job_id = int(match.group(1))
    with open(os.path.join(config.run.dir, JOB_ID_FILE), "w") as fh:
        fh.write(f"{job_id}\n")
    if not (wait or config.launcher.wait):
        return 0
    return wait_for_job(job_id, config.run.dir)


def job_state(job_id: int) -> dict[str, str] | None:
    """`scontrol show job -o` as a dict; None once the controller has forgotten the job (MinJobAge after it ended)."""
    result = subprocess.run(["scontrol", "show", "job", "-o", str(job_id)], capture_output=True, text=True,
                            timeout=60)
    if result.returncode != 0:
        if "Invalid job id" in result.stderr:
            return None
        raise UserError(f"scontrol show job {job_id} failed: {result.stderr.strip()}")
    return dict(token.split("=", 1) for token in result.stdout.split() if "=" in token)


def wait_for_job(job_id: int, run_dir: str, poll_s: float = POLL_S) -> int:
    """Follow the job (through requeues) until it ends; 0 when the run completed, else a UserError with the log."""
    log = os.path.join(run_dir, LOG_PATTERN.replace("%j", str(job_id)))
    sys.stderr.write(f"[trainer] waiting for job {job_id} (log: {log}; Ctrl-C stops waiting, not the job)\n")
    seen, confirmed = None, False
    try:
        while True:
            info = job_state(job_id)
            state = info.get("JobState") if info else None
            if state != seen:
                restarts = f", restarts {info.get('Restarts', '0')}" if info else ""
                sys.stderr.write(f"[trainer] job {job_id}: {state or 'gone from the queue'}{restarts}\n")
                seen = state
            if info is None:
                break
            if state in FINISHED_STATES:
                # A preempted or failed node's job may still be requeued by Slurm: believe the end once it stays.
                if confirmed:
                    break
                confirmed = True
            else:
                confirmed = False
            time.sleep(poll_s)
    except KeyboardInterrupt:
        sys.stderr.write(f"[trainer] stopped waiting; job {job_id} keeps running (log: {log})\n")
        raise
    status = run_status(run_dir)
    if status in SUCCESSFUL_STATUSES:
        return 0
    exit_code = info.get("ExitCode", "?") if info else "?"
    raise UserError(f"job {job_id} ended {seen or 'unknown'} (exit code {exit_code}) and the run is "
                    f"{status or 'without a summary'}; see {log}")


def run_status(run_dir: str) -> str | None:
    """The `status` of the run's summary.json (completed, early_stopped, preempted), None without one."""
    import json

    try:
        with open(os.path.join(run_dir, "summary.json")) as fh:
            return json.load(fh).get("status")
    except (OSError, ValueError):
        return None
