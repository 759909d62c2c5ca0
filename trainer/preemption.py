"""Preemption: a request on any rank makes every rank stop at the same step boundary.

A request comes in one of two ways:
- a signal to the worker, SIGUSR1 or SIGTERM (Slurm's TERM to every process of a job it ends, `kill` by hand);
- a request file, named by $TRAINER_PREEMPT_FILE: the Slurm batch script writes it when Slurm signals the script
  (slurm/templates/train.sbatch). A file outlives its writer and waits for its reader, so a request made while
  the workers are still starting (importing, loading the model, before this watcher exists) is answered at the
  first step boundary instead of being lost, and no other process of the step (a launcher, a helper that a
  signal would end) is disturbed.

The handler only sets a flag (nothing unsafe happens inside a signal handler). After each optimizer step the
ranks agree through one tiny all-reduce (max of the flags), so a request that reached one rank stops them all at
the same step; the recipe then saves a checkpoint there and exits with EXIT_REQUEUE, which the batch script turns
into `scontrol requeue`. Further requests during the save are absorbed by the same flag, so they cannot interrupt
it half-way.
"""

from __future__ import annotations

import os
import signal
import time

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
REQUEST_FILE_ENV = "TRAINER_PREEMPT_FILE"
# One look at the request file per rank and second at most: a stat per step would load a shared filesystem's
# metadata server for nothing when steps are short and ranks many.
REQUEST_FILE_POLL_S = 1.0


class PreemptionWatcher:
    def __init__(self, request_file: str | None = None):
        self.reason = ""  # the signal's name, or what the request file says (the signal the batch script got)
        self._request_file = request_file if request_file is not None else os.environ.get(REQUEST_FILE_ENV, "")
        self._next_poll = 0.0
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): preemption is then not watched
                pass
        self._poll_request_file()  # a request made before this watcher existed waits in the file

    def _handle(self, signum, frame) -> None:
        self.reason = self.reason or signal.Signals(signum).name

    def _poll_request_file(self) -> None:
        if self.reason or not self._request_file or time.monotonic() < self._next_poll:
            return
        self._next_poll = time.monotonic() + REQUEST_FILE_POLL_S
        try:
            with open(self._request_file) as fh:
                self.reason = fh.read().strip() or "preemption requested"
        except FileNotFoundError:
            pass

    def should_stop(self, strategy) -> bool:
        """True on every rank once any rank received a request (collective: call on all ranks each step)."""
        self._poll_request_file()
        return strategy.all_reduce_max(1.0 if self.reason else 0.0) > 0

    @property
    def signal_name(self) -> str:
        """Why this rank stops (SIGUSR1, SIGTERM); empty when only a peer rank was asked."""
        return self.reason

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
