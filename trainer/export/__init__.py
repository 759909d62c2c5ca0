"""`trainer export`: turn a run's checkpoint (DCP or DeepSpeed, any world size) or final/ into a Hugging Face model
dir, a PEFT adapter dir, or an adapter merged into its base. See docs/checkpoints.md.

The output is written to `OUT.tmp` and renamed to `OUT` when complete, so a crash never leaves a half-written
model under the requested name.
"""

from __future__ import annotations

import os
import shutil
import time

from trainer.errors import UserError

TARGETS = ("hf", "adapter", "merged")


def export(path: str, to: str, out_dir: str, dtype: str = "auto", max_shard_bytes: int = 5 * 1000**3,
           log=print) -> dict:
    """Export `path` (a run dir, checkpoint dir or final/) as `to` into `out_dir`; returns a report."""
    from trainer.export.source import open_source

    if to not in TARGETS:
        raise UserError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise UserError(f"--out {out_dir} exists and is not empty: choose a new dir (or remove it)")
    started = time.perf_counter()
    source = open_source(path, log=log)
    _check_target(source, to)
    tmp = f"{out_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    from trainer.export import hf

    rss_before = hf.rss_bytes("VmRSS")

    if to == "hf":
        report = hf.write_hf_model(source, tmp, dtype, max_shard_bytes)
    elif to == "adapter":
        report = hf.write_adapter(source, tmp, dtype)
    else:
        report = hf.write_merged(source, tmp, dtype)
    from trainer.weights import apply_umask

    apply_umask(tmp)
    if os.path.isdir(out_dir):
        os.rmdir(out_dir)  # empty (checked above)
    os.replace(tmp, out_dir)
    report.setdefault("rss_before_bytes", rss_before)
    report.update(source=source.description, to=to, out=out_dir, seconds=round(time.perf_counter() - started, 2),
                  peak_rss_bytes=hf.rss_bytes("VmHWM"))
    return report


def _check_target(source, to: str) -> None:
    from trainer.adapters import LORA_FAMILY

    method = source.config.peft.name
    if to == "hf" and source.peft:
        raise UserError(f"{source.location} is a PEFT ({method}) checkpoint: use --to adapter for the adapter, or "
                        "--to merged for the adapter merged into its base model")
    if to in ("adapter", "merged") and not source.peft:
        raise UserError(f"--to {to} needs a PEFT run, but {source.location} is a full fine-tune (peft=none): "
                        "use --to hf")
    if to == "merged" and method not in (*LORA_FAMILY, "ia3"):
        raise UserError(f"--to merged: a {method} adapter adds virtual tokens and cannot merge into the base weights; "
                        "use --to adapter")
    if to == "adapter" and source.kind == "checkpoint" and method not in (*LORA_FAMILY, "ia3"):
        raise UserError(f"--to adapter from a checkpoint supports LoRA, DoRA, QLoRA and IA3 runs; for {method}, "
                        "export the run dir once it has finished (its final/ is the adapter)")
