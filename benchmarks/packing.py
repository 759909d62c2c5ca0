"""Packing against its baseline (unpacked, padded micro batches), side by side in one run: one epoch of the same
samples each way, with the slots each way fills, its wall time and its real tokens per second.

    python benchmarks/packing.py [--data FILE --format alpaca] [--max-seq-len 512]

Default data: the shared Alpaca sample when this checkout sits beside it (../shared/data/samples), else the
embedded demo's training file."""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, first_float, table, train

SHARED_ALPACA = REPO.parent / "shared" / "data" / "samples" / "alpaca_100.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(SHARED_ALPACA) if SHARED_ALPACA.is_file() else None)
    parser.add_argument("--format", default="alpaca")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    data = [f"data.path={args.data}", f"data.format={args.format}", "data.template=alpaca"] if args.data else []
    common = [*data, f"data.max_seq_len={args.max_seq_len}", "data.val_ratio=0.05", f"train.epochs={args.epochs}",
              "train.max_steps=0", "eval.every_n_steps=0", "checkpoint.every_n_steps=0"]
    check = subprocess.run([sys.executable, "-m", "trainer.cli", "data", "check", *common, "data.packing=true",
                            "train.micro_batch_size=8"], cwd=REPO, capture_output=True, text=True)
    report = check.stdout + check.stderr
    slots = {"packed": first_float(r"efficiency ([\d.]+)% \(real tokens / slots\)", report),
             "unpacked": first_float(r"padded to their longest sample: ([\d.]+)% of slots", report)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, overrides in (("unpacked (baseline)", ["data.packing=false", "train.micro_batch_size=8",
                                                          "train.global_batch_size=8"]),
                                 ("packed", ["data.packing=true", "train.micro_batch_size=2",
                                             "train.global_batch_size=2"])):
            summary, _ = train(Path(tmp) / label.split()[0], *common, *overrides)
            used = slots[label.split()[0]]
            rows.append([label, summary["steps"], summary["tokens_seen"], used if used is not None else "?",
                         summary["wall_seconds"], summary["tokens_per_second"] or 0.0])
    source = args.data or "the embedded demo data"
    print(f"one epoch of {source} at max_seq_len {args.max_seq_len} (8 samples per unpacked step; 2 rows of "
          f"{args.max_seq_len} per packed step):")
    print(table(["", "steps", "tokens", "slots used %", "wall s", "real tokens/s"], rows))
    if rows[0][4] and rows[1][4]:
        print(f"packed epoch takes {rows[1][4] / rows[0][4]:.2f}x the unpacked one's wall time")


if __name__ == "__main__":
    main()
