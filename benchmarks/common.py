"""What every benchmark shares: run `trainer train` as a user would and read what the run reports."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
QUIET = ("eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false")


def train(run_dir: Path, *overrides: str) -> tuple[dict, str]:
    """(summary.json, the run's stderr) of `trainer train run.dir=RUN_DIR OVERRIDES...`; fails loudly."""
    command = [sys.executable, "-m", "trainer.cli", "train", f"run.dir={run_dir}", *QUIET, *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=None)
    if result.returncode != 0:
        sys.exit(f"benchmark run failed ({' '.join(overrides)}):\n{result.stderr[-3000:]}")
    return json.loads((run_dir / "summary.json").read_text()), result.stderr


def first_float(pattern: str, text: str) -> float | None:
    match = re.search(pattern, text)
    return float(match.group(1)) if match else None


def table(headers: list[str], rows: list[list]) -> str:
    """A fixed-width text table (numbers right-aligned)."""
    cells = [[str(h) for h in headers]] + [[f"{v:,.1f}" if isinstance(v, float) else str(v) for v in row]
                                          for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    return "\n".join("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                     for row in cells)
