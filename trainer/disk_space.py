"""Disk space for a checkpoint: refuse a save that cannot fit before writing any of it, and word a full disk.

A save that runs out of space half-way leaves tens of megabytes (or gigabytes) of a shard that can never load, and
torch's own error says nothing of the disk. So before a save every rank compares the free space under the run dir
with what the save will write (the newest committed checkpoint's size, or this rank's trainable weights and
optimizer state before the first one), and the ranks agree by an all-reduce; a save that still meets ENOSPC has its
partial files removed. Either way the run stops with one line naming the dir and the free and needed bytes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil

from trainer.errors import UserError

# Tests cap the free space the check sees (a tmpfs gives them a real ENOSPC); never set outside tests.
FREE_BYTES_ENV = "TRAINER_TEST_FREE_BYTES"
MARGIN = 1.05  # headers, the RNG and trainer-state files, file-system blocks


class DiskFull(UserError):
    def __init__(self, directory: str, free: int, needed: int, during: bool):
        when = "ran out of space while saving (its partial files are removed)" if during else "has too little space"
        super().__init__(f"disk full: {directory} {when}: {_mib(free)} free, a checkpoint needs about {_mib(needed)}; "
                         "free space there (or lower checkpoint.keep_last, or move run.dir) and run the same command "
                         "again to resume from the newest committed checkpoint")


def _mib(num_bytes: int) -> str:
    return f"{num_bytes / 2**20:.1f} MiB"


def free_bytes(path: str, real: bool = False) -> int:
    """Free bytes under PATH; `real` ignores a test's cap (what to report after a real ENOSPC)."""
    override = None if real else os.environ.get(FREE_BYTES_ENV)
    return int(override) if override else shutil.disk_usage(path).free


def committed_bytes(directory: str, marker: str) -> int:
    """A committed checkpoint's size, from its marker's file list."""
    try:
        with open(os.path.join(directory, marker)) as fh:
            return sum(json.load(fh).get("files", {}).values())
    except (OSError, ValueError, AttributeError):
        return 0


def state_bytes(model, optimizer) -> int:
    """What this rank's first save writes: its trainable parameters and its optimizer state."""
    from trainer.strategy.base import tensor_bytes

    params = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return params + tensor_bytes(optimizer.state)


def needed_bytes(previous: int, model, optimizer) -> int:
    return int((previous or state_bytes(model, optimizer)) * MARGIN)


def is_out_of_space(err: BaseException) -> bool:
    """ENOSPC anywhere in the exception's chain, or in the per-rank failures DCP gathers into one exception."""
    seen = 0
    while err is not None and seen < 20:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC or "No space left on device" in str(err):
            return True
        err, seen = err.__cause__ or err.__context__, seen + 1
    return False
