"""Side-by-side throughput of the strategies on the embedded model, in one run (machines are noisy: compare
only rows of the same run). Usage: python benchmarks/run.py [--steps N] [--strategies single,ddp,...]"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run(strategy: str, steps: int, out: Path) -> dict:
    ranks = 1 if strategy == "single" else 2
    command = [sys.executable, "-m", "trainer.cli", "train", f"run.dir={out / strategy}", f"strategy={strategy}",
               f"launcher.nproc_per_node={ranks}", f"train.max_steps={steps}", "train.micro_batch_size=4",
               "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false",
               "logger.plot=false", "peft=none"]
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    summary = json.loads((out / strategy / "summary.json").read_text())
    return {"strategy": strategy, "ranks": ranks, "tokens_per_second": summary["tokens_per_second"],
            "wall_seconds": summary["wall_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--strategies", default="single,ddp,fsdp,zero2,zero3")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [run(s, args.steps, Path(tmp)) for s in args.strategies.split(",")]
    print(f"{'strategy':<14}{'ranks':>6}{'tokens/s':>12}{'wall s':>9}")
    for row in rows:
        print(f"{row['strategy']:<14}{row['ranks']:>6}{row['tokens_per_second'] or 0:>12,.0f}{row['wall_seconds']:>9}")


if __name__ == "__main__":
    main()
