"""Resuming a ZeRO checkpoint on another world size, through DeepSpeed's universal checkpoint format.

ZeRO writes each rank's partition of the flat fp32 master weights and optimizer state, so its files only fit the
world size that wrote them. DeepSpeed's `ds_to_universal` rewrites them as one folder per parameter (fp32 weight,
exp_avg, exp_avg_sq), which its loader (`checkpoint.load_universal`) slices for any world size. We convert on
resume, into a scratch dir of the resuming run (never into the checkpoint itself, which may belong to another
run), and delete the conversion once every rank has loaded it: it is as large as the checkpoint.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from trainer.errors import UserError

STATE = "state"  # the tag folder inside the scratch dir, as DeepSpeed's loader expects `load_dir/tag`


def convert_to_universal(state_dir: str, scratch_dir: str) -> str:
    """Convert the DeepSpeed checkpoint in `state_dir` into `scratch_dir`/state; returns that folder.

    Written to a temporary sibling and renamed into place, so a crash mid-conversion leaves no half-converted
    folder that a later resume would trust; a complete earlier conversion is reused."""
    converted = os.path.join(scratch_dir, STATE)
    if os.path.isdir(converted):
        return converted
    partial = f"{scratch_dir}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    workers = str(max(1, min(4, (os.cpu_count() or 2) // 2)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", state_dir,
               "--output_folder", os.path.join(partial, STATE), "--num_extract_workers", workers,
               "--num_merge_workers", workers,
               # Our checkpoints carry no Megatron-style universal_checkpoint_info; DeepSpeed supplies its default.
               "--inject_missing_state"]
    log_path = f"{scratch_dir}.log"
    with open(log_path, "w") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if result.returncode != 0 or not os.path.isdir(os.path.join(partial, STATE, "zero")):
        with open(log_path) as log:
            lines = [line.strip() for line in log if line.strip()]
        last = lines[-1] if lines else f"exit code {result.returncode}"
        raise UserError(f"cannot convert {state_dir} to DeepSpeed's universal checkpoint for another world size "
                        f"({last}; full log: {log_path}); resume on the world size that saved it instead")
    os.replace(partial, scratch_dir)
    os.remove(log_path)
    return converted
