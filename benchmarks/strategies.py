"""Throughput of every strategy on the embedded model, side by side in one run (these machines are noisy: compare
only rows of the same run). `single` is the baseline; the others run 2 ranks (gloo on CPU, NCCL on GPUs).

    python benchmarks/strategies.py [--steps N] [--strategies single,ddp,...]"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import table, train

ALL = "single,ddp,fsdp,zero1,zero2,zero3,zero3_offload"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", default=ALL)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies.split(","):
            ranks = 1 if strategy == "single" else 2
            summary, _ = train(Path(tmp) / strategy, f"strategy={strategy}", f"launcher.nproc_per_node={ranks}",
                               f"train.max_steps={args.steps}", "train.micro_batch_size=4", "train.global_batch_size=8",
                               "peft=none", "checkpoint.every_n_steps=0", "eval.every_n_steps=0")
            per_second = summary["tokens_per_second"] or 0.0
            tokens_per_step = summary["tokens_seen"] / max(summary["steps"], 1)
            rows.append([strategy, ranks, per_second, 1000 * tokens_per_step / per_second if per_second else 0.0,
                         summary["wall_seconds"]])
    print(f"full fine-tuning of the embedded model, {args.steps} steps of 8 packed rows (steady state after warm-up; "
          "wall includes start-up):")
    print(table(["strategy", "ranks", "tokens/s", "ms/step", "wall s"], rows))


if __name__ == "__main__":
    main()
