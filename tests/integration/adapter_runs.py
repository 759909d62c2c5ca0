"""Short adapter runs on the embedded base, and the questions they are asked (tests/integration/conftest.py)."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli

QUESTIONS = ["Where does the flunk live?", "Which colour does the bolep have?", "Tell me the colour of the snugoomp."]
SHORT = ("train.max_steps=8", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
         "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "optim.lr=5e-3", "peft.r=8")


def train_run(run_dir: Path, *overrides: str) -> None:
    result = run_cli("train", f"run.dir={run_dir}", *SHORT, *overrides)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
