"""The process that trains: `python -m trainer.worker RUN_DIR`, started by the launcher (in-process for one
rank; by torchrun, the deepspeed launcher or srun for several). It reads the frozen config, never composes.

A failing worker records why in `RUN_DIR/.workers/rank-N.json`, so the launcher can report that worker's
error (rather than the launcher's own) and exit with its code. Each worker also writes its pid to
`RUN_DIR/.workers/pid-N`, so the launcher can wait for workers that outlive their torchrun.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

from trainer.errors import EXIT_USER_ERROR, UserError

STATUS_DIR = ".workers"
# Written by the local launcher when it is signalled; workers poll it ($TRAINER_PREEMPT_FILE, trainer/preemption.py).
PREEMPT_REQUEST = "preempt-request"
PR_SET_PDEATHSIG = 1


def record_failure(run_dir: str, rank: int, exit_code: int, message: str) -> None:
    directory = os.path.join(run_dir, STATUS_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"rank-{rank}.json"), "w") as fh:
        json.dump({"rank": rank, "exit_code": exit_code, "message": message}, fh)


def read_failures(run_dir: str) -> list[dict]:
    directory = os.path.join(run_dir, STATUS_DIR)
    if not os.path.isdir(directory):
        return []
    failures = []
    for name in sorted(os.listdir(directory)):
        if name.startswith("rank-") and name.endswith(".json"):
            with open(os.path.join(directory, name)) as fh:
                failures.append(json.load(fh))
    return failures


def record_pid(run_dir: str, rank: int) -> None:
    directory = os.path.join(run_dir, STATUS_DIR)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, f"pid-{rank}"), "w") as fh:
        fh.write(str(os.getpid()))


def recorded_pids(run_dir: str) -> list[int]:
    directory = os.path.join(run_dir, STATUS_DIR)
    pids = []
    for name in os.listdir(directory) if os.path.isdir(directory) else []:
        if name.startswith("pid-"):
            try:
                with open(os.path.join(directory, name)) as fh:
                    pids.append(int(fh.read()))
            except (OSError, ValueError):
                pass
    return pids


def running_workers(run_dir: str) -> list[int]:
    """Every live trainer.worker of RUN_DIR, found in /proc (also one that has not recorded its pid yet): the
    process whose arguments run the module, not a launcher (torchrun agent, deepspeed) that names it for its
    children."""
    found = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                args = fh.read().split(b"\0")
        except OSError:
            continue
        runs_module = any(a == b"-m" and b == b"trainer.worker" for a, b in zip(args, args[1:]))
        launcher = any(b"launch.agent" in a or b"torch.distributed.run" in a or a.endswith(b"deepspeed")
                       for a in args)
        if runs_module and not launcher and os.fsencode(run_dir) in args and is_worker_alive(int(entry), run_dir):
            found.append(int(entry))
    return found


def is_worker_alive(pid: int, run_dir: str | None = None) -> bool:
    """The pid is a trainer.worker (of RUN_DIR, when given: not a process that reused the pid) that has not exited
    (zombies excluded; a stopped one is alive)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmdline = fh.read()
        if b"trainer.worker" not in cmdline or (run_dir and os.fsencode(run_dir) not in cmdline):
            return False
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def launcher_alive(parent: int) -> bool:
    """The process that started this worker (its pid taken first thing in main) is still its parent: an orphan is
    adopted by the init process or a subreaper. Any launcher counts: torchrun, deepspeed, srun's slurmstepd."""
    return os.getppid() == parent


def _stop_with_parent(parent: int) -> None:
    """SIGTERM (a preemption request: checkpoint and stop) when the process that started this worker dies, even by
    SIGKILL: torchrun starts workers in sessions of their own and never tells them it is gone, so without this they
    would train on, unlocked, beside the next job on the run dir (Linux; elsewhere a no-op)."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if not launcher_alive(parent):  # it died before the prctl: nothing would ever signal us
        os.kill(os.getpid(), signal.SIGTERM)


def _leave_if_orphaned_during_start_up(run_dir: str, rank: int, parent: int) -> None:
    """torchrun hosts the store through which the workers form their process group (NCCL: at the first
    collective): if it dies while they start, they would wait for it until the group's timeout (30 minutes). Until
    the training loop begins, a worker whose launcher is gone records a stop with nothing to save and exits; from
    then on, a launcher's death is a preemption request like any other (a checkpoint at the next step boundary)."""
    import threading

    from trainer.errors import EXIT_REQUEUE
    from trainer.preemption import TRAINING_STARTED

    def watch() -> None:
        while not TRAINING_STARTED.wait(0.5):
            if not launcher_alive(parent):
                record_failure(run_dir, rank, EXIT_REQUEUE, "the launcher died while the workers were starting: "
                               "stopped before training started, nothing to save; run the same command again")
                os._exit(EXIT_REQUEUE)

    threading.Thread(target=watch, name="orphan-at-start-up", daemon=True).start()


def main(argv: list[str]) -> int:
    parent = os.getppid()  # the launcher, taken before anything else: a later change means it died
    from trainer.preemption import watch

    watch()  # first: from here on a preemption signal only sets a flag, whatever the worker is doing
    from trainer.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    args = [a for a in argv if not a.startswith("--local_rank")]  # the deepspeed launcher adds --local_rank=N
    if len(args) != 1:
        sys.stderr.write("usage: python -m trainer.worker RUN_DIR\n")
        return EXIT_USER_ERROR
    run_dir = args[0]
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)))
    record_pid(run_dir, rank)
    _stop_with_parent(parent)
    _leave_if_orphaned_during_start_up(run_dir, rank, parent)
    from trainer.cuda_allocator import use_expandable_segments

    use_expandable_segments()  # before anything touches CUDA (a Slurm job script starts workers without the launcher)
    from trainer.config.frozen import load_frozen
    from trainer.recipe import run_training

    try:
        # A deliberate non-zero exit (EXIT_REQUEUE after preemption, a non-finite stop) is recorded by every rank
        # before any of them exits, so the launcher can report it with its own exit code.
        return run_training(load_frozen(run_dir), on_exit_code=lambda code, message: record_failure(
            run_dir, rank, code, message))
    except UserError as err:
        record_failure(run_dir, rank, EXIT_USER_ERROR, str(err))
        sys.stderr.write(f"trainer: [rank {rank}] {err}\n")
        return EXIT_USER_ERROR
    except BaseException as err:
        if isinstance(err, SystemExit) and err.code in (0, None):
            raise
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
        last = traceback.format_exception_only(type(err), err)[-1].strip()
        record_failure(run_dir, rank, code, last)
        raise


if __name__ == "__main__":
    exit_code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: every file is closed and committed by now, and native threads of the
    # communication libraries (gloo, DeepSpeed) can abort the process while being destroyed at exit,
    # turning a finished run into a failed one.
    os._exit(exit_code)
