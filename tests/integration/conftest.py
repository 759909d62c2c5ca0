"""Fixtures several integration modules share: two adapter runs on the embedded base, trained once per session.

Session-scoped here (not module-scoped in one test file) so that `trainer generate`'s and `trainer serve`'s tests use
the same two runs; tests/conftest.py keeps the tests that use them on one xdist worker.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.integration.adapter_runs import train_run


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory) -> tuple[Path, Path]:
    """Adapter `facts` learns the demo's answers; adapter `shrug` learns to answer every question the same way."""
    root = tmp_path_factory.mktemp("adapters")
    shrug_data = root / "shrug.jsonl"
    questions = [json.loads(line)["instruction"] for line in
                 (REPO / "trainer" / "assets" / "demo-facts" / "train.jsonl").read_text().splitlines()[:64]]
    shrug_data.write_text("".join(json.dumps({"instruction": q, "input": "", "output": "The meadow is purple."}) + "\n"
                                  for q in questions))
    train_run(root / "facts")
    # Its own data, with the demo's layout and row length, so both adapters answer the same prompts.
    train_run(root / "shrug", f"data.path={shrug_data}", "data.val_ratio=0.1", "train.max_steps=12",
              "data.template=alpaca", "data.max_seq_len=104")
    return root / "facts", root / "shrug"


