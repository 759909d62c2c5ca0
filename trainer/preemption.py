"""Preemption: a request on any rank makes every rank stop at the same step boundary.

A request comes in one of two ways:
- a signal, SIGUSR1 or SIGTERM to a worker (Slurm's TERM to every process of a job it ends, `kill` by hand), or
  SIGUSR1, SIGTERM or SIGINT (Ctrl-C) to the `trainer train` launcher, which passes it on through the file below;
- a request file, named by $TRAINER_PREEMPT_FILE: the Slurm batch script writes it when Slurm signals the script
  (slurm/templates/train.sbatch), and the local launcher when it is signalled (launch/local.py). A file outlives
  its writer and waits for its reader, so a request made while the workers are still starting (importing, loading
  the model) is answered instead of being lost, and no other process of the step (a launcher, a helper that a
  signal would end) is disturbed.

The process's one watcher is installed first thing (trainer/worker.py before any heavy import; the launcher before
it starts training), so a signal at any moment only sets a flag (nothing unsafe happens inside a signal handler)
and can never kill the process half-way. The recipe asks at step boundaries and between evaluation batches; the
ranks agree through one tiny all-reduce (max of the flags), so a request that reached one rank stops them all at
the same point; the recipe then saves a checkpoint and exits with EXIT_REQUEUE, which the batch script turns into
`scontrol requeue`. Further requests during the save are absorbed by the same flag, so they cannot interrupt it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
# The launcher a user runs in a terminal also treats Ctrl-C as a request to checkpoint and stop (SIGKILL stops
# without a save). Workers do not get a terminal's SIGINT: torchrun starts each in a session of its own.
LAUNCHER_SIGNALS = (*PREEMPTION_SIGNALS, signal.SIGINT)
REQUEST_FILE_ENV = "TRAINER_PREEMPT_FILE"
# One look at the request file per rank and second at most: a stat per step would load a shared filesystem's
# metadata server for nothing when steps are short and ranks many.
REQUEST_FILE_POLL_S = 1.0
# The ranks agree on why they stop as well as that they do (the max of each rank's code), so the log names the signal
# whichever rank it reached first; a reason not listed (a request file's own words) counts as the first.
AGREED_REASONS = ("preemption requested", "SIGINT", "SIGTERM", "SIGUSR1")


class Preempted(Exception):
    """Raised out of an evaluation that a preemption request stopped (every rank raises it at the same batch)."""


class PreemptionWatcher:
    def __init__(self, request_file: str | None = None, signals=PREEMPTION_SIGNALS):
        self.reason = ""  # the signal's name, or what the request file says (the signal the batch script got)
        self.agreed_reason = ""  # why the ranks stop, agreed by all of them (set by should_stop)
        self._request_file = request_file if request_file is not None else os.environ.get(REQUEST_FILE_ENV, "")
        self._forward_to = ""  # a file this process writes on a request, for workers it started
        self._next_poll = 0.0
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): preemption is then not watched
                pass
        self._poll_request_file()  # a request made before this watcher existed waits in the file

    def _handle(self, signum, frame) -> None:
        self.request(signal.Signals(signum).name)

    def request(self, reason: str) -> None:
        self.reason = self.reason or reason
        self._write_forward()

    def forward_to(self, path: str) -> None:
        """Pass requests on to the workers this process starts, through the request file they poll (also one that
        came before this call)."""
        self._forward_to = path
        self._write_forward()

    def _write_forward(self) -> None:
        if not (self.reason and self._forward_to):
            return
        try:
            with open(self._forward_to, "w") as fh:
                fh.write(self.reason)
        except OSError:
            pass  # the run dir is gone or read-only: the workers' own signals still work

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
        code = AGREED_REASONS.index(self.reason) + 1 if self.reason in AGREED_REASONS else int(bool(self.reason))
        agreed = int(strategy.all_reduce_max(float(code)))
        if agreed:
            self.agreed_reason = AGREED_REASONS[agreed - 1] if agreed > 1 or not self.reason else self.reason
        return agreed > 0

    def check(self, strategy) -> None:
        """Raise `Preempted` on every rank once any rank received a request (collective, like should_stop)."""
        if self.should_stop(strategy):
            raise Preempted(self.reason)

    @property
    def signal_name(self) -> str:
        """Why the ranks stop (SIGUSR1, SIGTERM, ...), the same on every rank once should_stop said so."""
        return self.agreed_reason or self.reason

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


_WATCHER: PreemptionWatcher | None = None
# Set when the training loop begins: before it a worker whose launcher died has nothing to save (trainer/worker.py).
TRAINING_STARTED = threading.Event()


def watch(signals=PREEMPTION_SIGNALS) -> PreemptionWatcher:
    """This process's watcher, installed on the first call: call it first thing, so that no signal that comes
    while the process starts up can kill it."""
    global _WATCHER
    if _WATCHER is None:
        _WATCHER = PreemptionWatcher(signals=signals)
    return _WATCHER


def unwatch() -> None:
    """Restore the signals' previous handlers; a request that came meanwhile is delivered to them now."""
    global _WATCHER
    if _WATCHER is None:
        return
    watcher, _WATCHER = _WATCHER, None
    watcher.close()
    if watcher.reason in signal.Signals.__members__:
        signal.raise_signal(signal.Signals[watcher.reason])
