"""`trainer data check` through the real CLI: the table on good data, one line naming file:line on bad data."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, REPO, assert_one_line_error, run_cli

DATA = FIXTURES / "data"
BAD = DATA / "bad"
SMALL_BATCH = ("train.micro_batch_size=1", "train.global_batch_size=1")


def _check(tmp_path: Path, *overrides: str):
    return run_cli("data", "check", f"paths.cache_dir={tmp_path / 'cache'}", *overrides, timeout=120)


def _source_row(stdout: str, name: str) -> dict:
    header = next(line for line in stdout.splitlines() if line.startswith("source "))
    row = next(line for line in stdout.splitlines() if name in line and ("train" in line or " val " in line))
    return dict(zip(header.split(), row.split()))


def test_the_default_demo_data_is_usable_and_the_table_says_why(tmp_path):
    result = _check(tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    row = _source_row(out, "demo-facts/train.jsonl")
    assert (row["records"], row["kept"], row["skipped"], row["truncated"]) == ("540", "540", "0", "0")
    assert _source_row(out, "demo-facts/val.jsonl")["records"] == "60"
    assert "template alpaca (built-in)" in out
    assert re.search(r"sample length \(tokens\): p50 \d+  p90 \d+  p99 \d+  max \d+", out)
    assert re.search(r"packing: 540 samples -> 135 rows of 104; efficiency 95\.\d%", out)
    assert re.search(r"unpacked micro batches of \d+, padded to their longest sample: \d+\.\d%", out)
    assert "sample 1 (" in out and "sample 2 (" in out and "[[The bolep is green.</s>]]" in out
    assert out.rstrip().splitlines()[-1].startswith("data is usable:")
    assert (tmp_path / "cache" / "data").is_dir()  # the check warms the cache training reads


def test_dolly_loads_through_the_column_mapping(tmp_path):
    result = _check(tmp_path, f"data.path={DATA / 'dolly.jsonl'}", "data.columns.input=context",
                    "data.columns.output=response", "data.val_ratio=0", "data.template=alpaca", *SMALL_BATCH)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _source_row(result.stdout, "dolly.jsonl")["kept"] == "6"
    assert "### Input:\n  | The harbour lighthouse was first lit in 1871" in result.stdout


def test_several_sources_are_mixed_and_counted_per_source(tmp_path):
    result = _check(tmp_path, "data=mix", *SMALL_BATCH)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {name: _source_row(result.stdout, name) for name in ("alpaca.json", "dolly.jsonl", "chat.jsonl")}
    assert {name: (r["records"], r["skipped"], r["weight"]) for name, r in rows.items()} == {
        "alpaca.json": ("12", "1", "1"), "dolly.jsonl": ("6", "0", "0.5"), "chat.jsonl": ("5", "1", "2")}
    assert "1 skipped: the conversation does not end with an assistant turn" in result.stdout
    assert "1 exact and 1 more normalised-text duplicates; 1 removed (data.dedup=exact)" in result.stdout
    assert "sample 1 (" in result.stdout and "sample 2 (" in result.stdout


@pytest.mark.parametrize("name,fmt,line,fragment", [
    ("malformed.jsonl", "alpaca", 3, "malformed JSON"),
    ("truncated.jsonl", "alpaca", 4, "the last line is cut off"),
    ("missing_field.jsonl", "alpaca", 2, "missing field 'output'"),
    ("mistyped_field.json", "alpaca", 5, "field 'output' is a number (expected a string)"),
    ("unknown_role.jsonl", "chat", 2, "unknown role 'bot' (expected one of system, user, assistant)"),
    ("empty.jsonl", "alpaca", 1, "the file is empty"),
    ("trailing_comma.json", "alpaca", 3, "trailing comma"),
    ("trailing_comma_object.jsonl", "alpaca", 2, "trailing comma"),
    ("malformed.json", "alpaca", 3, "malformed JSON"),
    ("bad_row.csv", "alpaca", 3, "the row has 4 fields but the header has 3"),
    ("not_utf8.jsonl", "alpaca", 2, "not UTF-8"),
])
def test_bad_input_exits_2_with_one_line_naming_file_and_line(tmp_path, name, fmt, line, fragment):
    path = BAD / name
    result = _check(tmp_path, f"data.path={path}", f"data.format={fmt}")
    assert_one_line_error(result, f"{path}:{line}: ", fragment, "(expected")
    assert not (tmp_path / "cache" / "data").exists() or not any(
        p for p in (tmp_path / "cache" / "data").iterdir() if not p.name.endswith(".lock"))


def test_a_conversation_ending_on_a_user_turn_is_an_error_under_strict(tmp_path):
    path = BAD / "ends_on_user.jsonl"
    result = _check(tmp_path, f"data.path={path}", "data.format=chat", "data.strict=true")
    assert_one_line_error(result, f"{path}:2: the conversation does not end with an assistant turn", "strict")


def test_train_reports_bad_data_the_same_way(tmp_path):
    path = BAD / "unknown_role.jsonl"
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"data.path={path}", "data.format=chat", timeout=120)
    assert_one_line_error(result, f"{path}:2: ", "unknown role 'bot'")
    # The run dir that command created held only its frozen config: it goes, so the corrected command starts clean.
    assert not (tmp_path / "run").exists()


def test_a_directory_that_held_the_users_files_is_never_removed(tmp_path):
    run_dir = tmp_path / "project"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("mine")
    result = run_cli("train", f"run.dir={run_dir}", f"data.path={BAD / 'unknown_role.jsonl'}", "data.format=chat",
                     timeout=120)
    assert result.returncode == 2
    assert (run_dir / "notes.txt").read_text() == "mine"


def test_a_run_dir_that_already_trained_is_kept_when_a_relaunch_fails(tmp_path):
    run_dir = tmp_path / "run"
    quick = ("train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=4", "eval.max_batches=1",
             "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "checkpoint.every_n_steps=2")
    trained = run_cli("train", f"run.dir={run_dir}", *quick, timeout=300)
    assert trained.returncode == 0, trained.stderr[-2000:]
    result = run_cli("train", f"run.dir={run_dir}", *quick, "train.max_steps=4",
                     f"data.path={BAD / 'unknown_role.jsonl'}", "data.format=chat", timeout=120)
    assert result.returncode == 2
    assert (run_dir / "checkpoints" / "step-000002" / "COMMITTED").is_file() and (run_dir / "final").is_dir()


@pytest.mark.parametrize("override,fragments", [
    ("data.format=xml", ["data.format", "'xml' is not one of"]),
    ("data.columns.answer=response", ["answer", "unknown key"]),
    ("data.columns.messages=turns", ["data.columns.messages", "is not a field of format alpaca"]),
    ("data.dedup=fuzzy", ["data.dedup", "none, exact, normalized"]),
])
def test_bad_data_config_is_one_line_naming_the_key(tmp_path, override, fragments):
    assert_one_line_error(_check(tmp_path, override), *fragments)


def test_help_and_unknown_subcommands():
    help_result = run_cli("data", "check", "--help", timeout=60)
    assert help_result.returncode == 0 and "usage: trainer data check" in help_result.stdout
    assert "data check" in run_cli("--help", timeout=60).stdout
    assert_one_line_error(run_cli("data", "inspect", timeout=60), "unknown data command 'inspect'")


def test_example_data_configs_point_at_shipped_fixtures():
    for config in sorted((REPO / "conf" / "data").glob("*.yaml")):
        text = config.read_text()
        for fixture in re.findall(r"tests/fixtures/data/([\w.]+)", text):
            assert (DATA / fixture).is_file(), f"{config.name} names a missing fixture {fixture}"
