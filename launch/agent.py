"""`python -m launch.agent TORCHRUN_ARGS`: torchrun (torch.distributed.run) for the local launcher, with two changes.

- A signal to it (SIGTERM, SIGINT, SIGUSR1) is a preemption request for its workers, passed on through the request
  file they poll ($TRAINER_PREEMPT_FILE, trainer/preemption.py): they checkpoint at their next step boundary and
  exit with EXIT_REQUEUE. Plain torchrun would SIGTERM them itself and SIGKILL them 30 s later (a large
  checkpoint takes longer), or die of SIGUSR1 and leave them behind.
- A worker's non-zero exit ends this process with that exit code and no traceback: the workers record why they
  stopped (trainer/worker.py) and the `trainer` launcher reports it in one line. torchrun's own ChildFailedError
  traceback for a preemption (exit 85) would read as a crash.
"""

from __future__ import annotations

import sys

# The signals torchrun itself handles by terminating its workers; the preemption signals are ours.
AGENT_SIGNALS = "SIGHUP,SIGQUIT"


def main(argv: list[str]) -> int:
    from trainer.preemption import LAUNCHER_SIGNALS, watch

    watcher = watch(LAUNCHER_SIGNALS)  # first: no signal may end this process before its workers stop
    import os

    from trainer.preemption import REQUEST_FILE_ENV

    watcher.forward_to(os.environ.get(REQUEST_FILE_ENV, ""))
    _quiet_about_preemption()
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args([f"--signals_to_handle={AGENT_SIGNALS}", *argv]))
    except ChildFailedError as err:
        _, failure = err.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as err:
        return 128 + int(err.sigval)
    return 0


def _quiet_about_preemption() -> None:
    """torchrun logs an error line for every worker that exits non-zero; a preemption's 85 is no error."""
    import logging

    from trainer.errors import EXIT_REQUEUE

    def keep(record: logging.LogRecord) -> bool:
        return f"(exitcode: {EXIT_REQUEUE})" not in record.getMessage()

    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(keep)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
