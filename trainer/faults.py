"""Named moments at which tests deliver a real signal to a process, to check what happens then.

`TRAINER_SIGNAL_AT=NAME[:SIGNAL]` (e.g. `eval-2:SIGTERM`) makes the process signal itself when it reaches the
moment NAME: `eval-N` (the evaluation at step N begins), `final-save` (the final model's save begins). Outside
tests the variable is unset and this is one dict lookup. A moment is hit once per process.
"""

from __future__ import annotations

import os
import signal

SIGNAL_AT_ENV = "TRAINER_SIGNAL_AT"
_hit: set[str] = set()


def fault_point(name: str) -> None:
    wanted = os.environ.get(SIGNAL_AT_ENV)
    if not wanted:
        return
    moment, _, sig = wanted.partition(":")
    if moment == name and name not in _hit:
        _hit.add(name)
        os.kill(os.getpid(), signal.Signals[sig or "SIGTERM"])
