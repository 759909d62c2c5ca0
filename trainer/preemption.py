"""Preemption: SIGUSR1 or SIGTERM on any rank makes every rank stop at the same step boundary.

The handler only sets a flag (nothing unsafe happens inside a signal handler). After each optimizer step
the ranks agree through one tiny all-reduce (max of the flags), so a signal that reached one rank stops
them all at the same step; the recipe then saves a checkpoint there and exits with EXIT_REQUEUE, which
Slurm's batch script (slurm/) turns into `scontrol requeue`. Further signals during the save are
absorbed by the same flag, so they cannot interrupt it half-way.
"""

from __future__ import annotations

import signal

PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionWatcher:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        for sig in PREEMPTION_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. embedded use): preemption is then not watched
                pass

    def _handle(self, signum, frame) -> None:
        self.received = self.received or signum

    def should_stop(self, strategy) -> bool:
        """True on every rank once any rank received a signal (collective: call on all ranks each step)."""
        return strategy.all_reduce_max(1.0 if self.received else 0.0) > 0

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def close(self) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
