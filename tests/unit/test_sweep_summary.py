"""`trainer sweep summary DIR` on hand-made run dirs: no training, no cluster."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli


def _point(sweep: Path, num: int, overrides: list[str], summary: dict | None, objective: str = "eval_after.loss",
           job_id: int | None = None, failure: int | None = None) -> None:
    run_dir = sweep / str(num)
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(f"run:\n  name: run\n  dir: {run_dir}\n  objective: {objective}\n")
    (run_dir / "sweep_point.json").write_text(json.dumps({"num": num, "overrides": overrides, "searched": []}))
    if summary is not None:
        (run_dir / "summary.json").write_text(json.dumps(summary))
    if job_id is not None:
        (run_dir / "slurm_job_id").write_text(f"{job_id}\n")
    if failure is not None:
        (run_dir / ".workers").mkdir()
        (run_dir / ".workers" / "rank-0.json").write_text(json.dumps({"rank": 0, "exit_code": failure}))


def _summary(eval_loss: float, exact_match: float, status: str = "completed") -> dict:
    return {"status": status, "steps": 10, "train_loss_last": eval_loss + 0.1,
            "eval_after": {"loss": eval_loss, "exact_match": exact_match}}


@pytest.fixture
def sweep(tmp_path: Path) -> Path:
    sweep = tmp_path / "sweep"
    common = ["train.max_steps=10", "launcher=slurm"]
    _point(sweep, 0, ["optim.lr=0.0001", "peft.r=8", *common], _summary(2.0, 0.30))
    _point(sweep, 1, ["optim.lr=0.0001", "peft.r=16", *common], _summary(1.5, 0.20))
    _point(sweep, 2, ["optim.lr=0.0002", "peft.r=8", *common], _summary(1.8, 0.50, status="early_stopped"))
    _point(sweep, 3, ["optim.lr=0.0002", "peft.r=16", *common], None, job_id=42)
    _point(sweep, 10, ["optim.lr=0.0003", "peft.r=16", *common], None, failure=1)
    return sweep


def _rows(sweep: Path) -> list[dict]:
    with open(sweep / "sweep_summary.csv") as fh:
        return list(csv.DictReader(fh))


def test_table_lists_swept_overrides_metrics_and_marks_the_lowest_eval_loss(sweep):
    result = run_cli("sweep", "summary", str(sweep), timeout=60)
    assert result.returncode == 0, result.stderr
    rows = _rows(sweep)
    assert list(rows[0]) == ["run", "optim.lr", "peft.r", "status", "steps", "train_loss_last", "eval_loss",
                             "eval_exact_match", "best"]  # the unchanging overrides are left out
    assert [r["run"] for r in rows] == ["0", "1", "2", "3", "10"]  # job order, not string order
    assert [r["status"] for r in rows] == ["completed", "completed", "early_stopped", "submitted (job 42)", "failed"]
    assert [r["run"] for r in rows if r["best"]] == ["1"]
    assert rows[1]["eval_loss"] == "1.5000" and rows[2]["eval_exact_match"] == "0.5000"
    markdown = (sweep / "sweep_summary.md").read_text()
    assert markdown == result.stdout.split("\ntables: ")[0]
    assert "| **1** | **0.0001** | **16** | **completed** |" in markdown
    assert "best by eval_after.loss (lowest)" in markdown


def test_a_metric_that_is_not_a_loss_is_maximised_and_the_direction_can_be_forced(sweep):
    assert run_cli("sweep", "summary", str(sweep), "--objective", "eval_after.exact_match").returncode == 0
    assert [r["run"] for r in _rows(sweep) if r["best"]] == ["2"]
    assert run_cli("sweep", "summary", str(sweep), "--objective", "eval_after.exact_match",
                   "--minimize").returncode == 0
    assert [r["run"] for r in _rows(sweep) if r["best"]] == ["1"]


def test_without_sweep_records_the_columns_are_the_config_keys_that_differ(tmp_path):
    for num, lr in enumerate(("0.001", "0.002")):
        run_dir = tmp_path / f"run-{lr}"
        run_dir.mkdir()
        (run_dir / "config.yaml").write_text(f"run:\n  dir: {run_dir}\noptim:\n  lr: {lr}\n  beta: 0.9\n")
        (run_dir / "summary.json").write_text(json.dumps(_summary(1.0 + num, 0.0)))
    assert run_cli("sweep", "summary", str(tmp_path)).returncode == 0
    rows = _rows(tmp_path)
    assert [(r["run"], r["optim.lr"], r["best"]) for r in rows] == [("run-0.001", "0.001", "best"),
                                                                   ("run-0.002", "0.002", "")]


def test_usage_and_user_errors(tmp_path):
    assert "sweep_summary.csv" in run_cli("sweep", "--help").stdout
    assert_one_line_error(run_cli("sweep", "summary", str(tmp_path / "missing")), "not a directory")
    assert_one_line_error(run_cli("sweep", "summary", str(tmp_path)), "no run dirs")
    assert_one_line_error(run_cli("sweep", "tabulate"), "unknown subcommand")


def test_a_mistyped_objective_is_refused_with_the_closest_key_and_the_tables_stay(sweep):
    first = run_cli("sweep", "summary", str(sweep))
    assert first.returncode == 0, first.stderr
    written = {name: (sweep / name).read_text() for name in ("sweep_summary.csv", "sweep_summary.md")}
    result = run_cli("sweep", "summary", str(sweep), "--objective", "eval_after.exact_macth")
    assert_one_line_error(result, "eval_after.exact_macth", "did you mean eval_after.exact_match?")
    assert {name: (sweep / name).read_text() for name in written} == written  # neither table is overwritten
