"""Every benchmark, one after another (`make bench`): against HF Trainer, strategies, packing, checkpoint I/O,
memory. Each compares against its own baseline inside its own run; run them on a quiet machine and quote the card
or CPU with the figures."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("vs_hf.py", "strategies.py", "packing.py", "checkpoint_io.py", "memory.py", "serving.py")


def main() -> int:
    failed = []
    for name in BENCHMARKS:
        print(f"== {name}", flush=True)
        if subprocess.run([sys.executable, str(HERE / name)], cwd=HERE).returncode != 0:
            failed.append(name)
        print(flush=True)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
