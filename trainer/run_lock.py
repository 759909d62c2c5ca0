"""An exclusive lock on a run dir, held by the launching process for the job's life.

Two jobs in one run dir prune each other's checkpoints, interleave metrics.jsonl and overwrite final/. The lock is
`flock(LOCK_EX | LOCK_NB)` on `RUN/.lock`: the kernel (or the NFS/Lustre lock manager) releases it when its holder
dies, however it dies, so a crashed or SIGKILLed run never blocks its own resume, and no stale-lock guessing is
needed. The holder writes who it is into the file (pid, host, start time, Slurm job, command) for the refusal
message only; a leftover of a dead holder is just overwritten.

Who holds it: `trainer train` with the local launcher, for as long as it runs (its torchrun/deepspeed launcher and
workers are its children, and are told to die with it: launch/local.py); on several nodes, node_rank 0's
`trainer train` only. Under Slurm the job script takes it on the first node (`python -m trainer.run_lock FD`
flocks a descriptor the batch shell keeps open until the job ends, so the lock lives exactly as long as the job),
and `trainer train launcher=slurm` holds it while it writes config.yaml and submits.

Where flock is not supported (some network file systems answer ENOLCK/EOPNOTSUPP), the file's content is the lock:
a holder on this host whose pid is gone, or an earlier run of the same Slurm job (a requeue), is stale and taken
over; a holder on another host cannot be checked from here, so the refusal says to remove the file if that job
is gone.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time

from trainer.errors import UserError

LOCK_NAME = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _holder_info(pid: int | None = None) -> dict:
    from trainer.config.frozen import redact_argv  # a secret given as an override stays out of the lock file

    return {"pid": pid or os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"), "command": " ".join(redact_argv(sys.argv))[:300]}


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 65536).decode("utf-8", errors="replace")
        holder = json.loads(data) if data.strip() else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())
    os.fsync(fd)


def describe(holder: dict) -> str:
    if not holder:
        return "another process (it wrote nothing into the lock file yet)"
    job = f", Slurm job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{job}, since {holder.get('started')}"


def _pid_alive(pid) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # someone else's live process (or an unreadable pid): not ours to call stale
    return True


class RunLock:
    """`with RunLock(run_dir):` holds the run dir; a second holder gets a one-line UserError naming the first."""

    def __init__(self, run_dir: str, log=None):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.log = log or (lambda message: sys.stderr.write(f"[trainer] {message}\n"))
        self.fd: int | None = None

    def acquire(self, fd: int | None = None, pid: int | None = None) -> None:
        """Take the lock (on `fd` when given: a descriptor that another process keeps open, see main())."""
        import fcntl

        os.makedirs(self.run_dir, exist_ok=True)
        self.fd = fd if fd is not None else os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(_read_holder(self.fd))
        except OSError as err:
            if err.errno not in _UNSUPPORTED:
                raise
            self._acquire_without_flock(pid)
            return
        previous = _read_holder(self.fd)
        if previous:
            self.log(f"{self.path}: the previous holder ({describe(previous)}) is gone; taking the run dir over")
        _write_holder(self.fd, _holder_info(pid))

    def _acquire_without_flock(self, pid: int | None) -> None:
        holder = _read_holder(self.fd)
        here = socket.gethostname()
        same_job = holder.get("slurm_job_id") and holder.get("slurm_job_id") == os.environ.get("SLURM_JOB_ID")
        stale = not holder or same_job or (holder.get("host") == here and not _pid_alive(holder.get("pid")))
        if not stale:
            self._refuse(holder, unverifiable=holder.get("host") != here)
        self.log(f"{self.path}: this file system does not support flock; the run dir is marked as ours in the file "
                 "(a second job on another host is only caught by its content)")
        _write_holder(self.fd, _holder_info(pid))

    def _refuse(self, holder: dict, unverifiable: bool = False) -> None:
        os.close(self.fd)
        self.fd = None
        hint = (f"if that job is gone (this file system has no flock, so its host cannot be asked), remove "
                f"{self.path}" if unverifiable else "wait for it to end (a resume then continues it), or use another "
                "run.dir")
        raise RunDirBusy(f"run dir {self.run_dir} is in use by {describe(holder)} (lock {self.path}): {hint}")

    def release(self) -> None:
        if self.fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self.fd, 0)  # an empty file: nobody holds it (the flock goes with the close anyway)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class RunDirBusy(UserError):
    """Another live job holds the run dir."""


def main(argv: list[str]) -> int:
    """`python -m trainer.run_lock RUN_DIR FD PID`: flock descriptor FD (opened on RUN_DIR/.lock by the calling
    shell, which keeps it open for the job's life) on behalf of process PID; exit 2 with one line if it is held."""
    if len(argv) != 3:
        sys.stderr.write("usage: python -m trainer.run_lock RUN_DIR FD PID\n")
        return 2
    run_dir, fd, pid = argv[0], int(argv[1]), int(argv[2])
    lock = RunLock(run_dir)
    try:
        lock.acquire(fd=fd, pid=pid)
    except UserError as err:
        sys.stderr.write(f"trainer: {err}\n")
        return 2
    return 0  # exiting leaves the lock with the shell's descriptor: flock belongs to the open file, not the process


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
