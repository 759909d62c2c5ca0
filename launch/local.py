"""Run a frozen config on this machine: in this process for one rank, else as torchrun/deepspeed workers.

Workers read the frozen config from the run dir (composed once, here). If any worker fails, the job
ends (torchrun stops the others) and this process reports the first failed worker's own error.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from trainer.config.schema import Config, LocalLauncherConfig
from trainer.errors import EXIT_REQUEUE, UserError


def worker_command(launcher: LocalLauncherConfig, run_dir: str) -> list[str]:
    if launcher.backend == "deepspeed":
        host, port = launcher.rdzv_endpoint.rsplit(":", 1)
        # The launcher script sits beside this interpreter in a venv that need not be on PATH.
        beside = os.path.join(os.path.dirname(sys.executable), "deepspeed")
        command = [beside if os.path.exists(beside) else (shutil.which("deepspeed") or "deepspeed"),
                   f"--num_gpus={launcher.nproc_per_node}",
                   f"--num_nodes={launcher.nnodes}", f"--master_addr={host}", f"--master_port={port}"]
        if launcher.hostfile:
            command.append(f"--hostfile={launcher.hostfile}")
        return [*command, "--module", "trainer.worker", run_dir]
    # torchrun, quiet about a worker's exit code and passing signals on as preemption requests (launch/agent.py)
    command = [sys.executable, "-m", "launch.agent", f"--nproc_per_node={launcher.nproc_per_node}",
               f"--max_restarts={launcher.max_restarts}"]
    if launcher.nnodes == 1:
        command.append("--standalone")  # a private rendezvous on a free port: no clash between jobs
    else:
        command += [f"--nnodes={launcher.nnodes}", "--rdzv_backend=c10d",
                    f"--rdzv_endpoint={launcher.rdzv_endpoint}", f"--rdzv_id={launcher.rdzv_id}"]
    return [*command, "-m", "trainer.worker", run_dir]


def worker_environment() -> dict:
    env = dict(os.environ)
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        env.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed's CPU accelerator (gloo) when there is no GPU
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def run_local(config: Config) -> int:
    from trainer.preemption import LAUNCHER_SIGNALS, REQUEST_FILE_ENV, watch
    from trainer.worker import PREEMPT_REQUEST, STATUS_DIR, read_failures

    # Normally installed already (launch/train.py); from here a signal to this process is a preemption request.
    watcher = watch(LAUNCHER_SIGNALS)
    if watcher.reason:  # before anything trained: nothing to save, and the same command starts afresh
        raise WorkerFailed(EXIT_REQUEUE, f"{watcher.reason} before training started: stopped with nothing to save; "
                           "run the same command again to start")
    launcher = config.launcher
    # The lock this process holds died with the previous launcher, but its workers may still be saving: never train
    # beside them (nor delete their records).
    _wait_for_workers(config.run.dir, "of an earlier launcher on this run dir", watcher)
    # One rank of `single` runs in this process; other strategies need a process group, which torchrun sets up.
    if launcher.world_size == 1 and launcher.backend == "torchrun" and config.strategy.name == "single":
        from trainer.recipe import run_training

        return run_training(config)
    status_dir = os.path.join(config.run.dir, STATUS_DIR)
    shutil.rmtree(status_dir, ignore_errors=True)
    os.makedirs(status_dir, exist_ok=True)
    env = worker_environment()
    # SIGTERM/SIGINT/SIGUSR1 here become a request file that the workers poll (a request made before they start
    # waits for them); Slurm's batch script may have named the file already.
    env[REQUEST_FILE_ENV] = env.get(REQUEST_FILE_ENV) or os.path.join(status_dir, PREEMPT_REQUEST)
    watcher.forward_to(env[REQUEST_FILE_ENV])
    command = worker_command(launcher, config.run.dir)
    sys.stderr.write(f"[trainer] launching {launcher.world_size} workers: {' '.join(command)}\n")
    # A session of its own: a terminal's Ctrl-C reaches this process only, which asks the workers to checkpoint.
    agent = subprocess.Popen(command, env=env, preexec_fn=_die_with_parent, start_new_session=True)
    returncode = agent.wait()
    # Uninterrupted: a signal here is what stopped the run, and they are saving its checkpoint.
    _wait_for_workers(config.run.dir, "that outlived their launcher")
    if returncode == 0:
        return 0
    failures = read_failures(config.run.dir)
    if failures and all(f["exit_code"] == EXIT_REQUEUE for f in failures):
        raise WorkerFailed(EXIT_REQUEUE, failures[0]["message"])  # preempted: checkpointed, run again to resume
    silent = sorted(set(range(launcher.nproc_per_node * launcher.node_rank,
                              launcher.nproc_per_node * (launcher.node_rank + 1))) - {f["rank"] for f in failures})
    if failures and silent:
        # A rank that vanished without a word (SIGKILL, out-of-memory killer) is the root cause; the others
        # only saw their peer disappear.
        raise WorkerFailed(returncode, f"worker rank {silent[0]} was killed or crashed without reporting "
                           f"(e.g. a signal or the out-of-memory killer); rank {failures[0]['rank']} then failed: "
                           f"{failures[0]['message']}")
    if failures:
        first = failures[0]
        raise WorkerFailed(first["exit_code"], f"worker rank {first['rank']} failed: {first['message']}")
    raise WorkerFailed(returncode, f"workers exited with code {returncode} (a rank was killed or "
                       "crashed before it could report; see the output above)")


def _wait_for_workers(run_dir: str, whose: str, watcher=None) -> None:
    """Workers outlive a torchrun or a launcher that was killed (SIGKILL): they got SIGTERM from the kernel
    (trainer/worker.py) and are saving a checkpoint. This process holds the run dir's lock, so it returns only once
    they are gone: after its own torchrun, and before it trains or starts workers of its own (there, given the
    `watcher`, a signal to this process such as Ctrl-C ends the wait: exit 85, leaving them to finish)."""
    from trainer.worker import is_worker_alive, recorded_pids, running_workers

    # Recorded pids, and workers still starting that have not recorded theirs yet.
    alive = sorted({pid for pid in recorded_pids(run_dir) if is_worker_alive(pid, run_dir)} |
                   set(running_workers(run_dir)))
    if alive:
        sys.stderr.write(f"[trainer] waiting for {len(alive)} workers {whose} to checkpoint and exit "
                         f"(pids {' '.join(map(str, alive))})\n")
    while alive:
        if watcher is not None and watcher.reason:
            raise WorkerFailed(EXIT_REQUEUE, f"{watcher.reason} while waiting for workers {whose} (pids "
                               f"{' '.join(map(str, alive))}): they are still saving; run the same command again "
                               "once they have exited (or kill them)")
        time.sleep(0.2)
        alive = [pid for pid in alive if is_worker_alive(pid, run_dir)]


def _die_with_parent() -> None:
    """In the torchrun/deepspeed launcher child: SIGTERM it when this process dies (even by SIGKILL). This process
    holds the run dir's lock (trainer/run_lock.py), which the kernel releases when it dies; workers outliving it
    would train unlocked beside the next job. SIGTERM is the preemption signal: they checkpoint and stop."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG (Linux; elsewhere a no-op)
    except (OSError, AttributeError):
        pass


class WorkerFailed(UserError):
    """A worker's failure, reported as that worker's message and exit code."""

    def __init__(self, exit_code: int, message: str):
        super().__init__(message)
        self.exit_code = exit_code
