"""The forgetting check: loss on data the fine-tune should leave alone, before/during/after, and the stop it drives."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, assert_one_line_error, compose_config, read_metrics, read_summary, run_cli

EVAL_EVERY_2 = ("eval.every_n_steps=2", "eval.generate_samples=0", "eval.max_batches=2", "logger.progress=false",
                "logger.plot=false")
FAST = ("train.max_steps=20", *EVAL_EVERY_2)
REPLAY_TEXT = REPO / "trainer" / "assets" / "demo-facts" / "replay.txt"


def test_the_demo_reports_forgetting_before_during_and_after(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *EVAL_EVERY_2, "train.max_steps=8", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    before, after = summary["eval_before"], summary["eval_after"]
    assert before["forgetting_increase"] == 0.0 and before["forgetting_loss"] > 0
    assert after["forgetting_increase"] == pytest.approx(after["forgetting_loss"] / before["forgetting_loss"] - 1)
    assert sum("eval_forgetting_loss" in r for r in read_metrics(run_dir)) == 1 + 3 + 1  # before, every 2, after
    assert summary["status"] == "completed"


def test_max_forgetting_stops_the_run_when_the_loss_rises_past_it(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *FAST, "eval.max_forgetting=0.01", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(run_dir)
    assert summary["status"] == "early_stopped" and summary["steps"] < 20
    assert "more than eval.max_forgetting=0.01" in result.stderr
    last = [r for r in read_metrics(run_dir) if "eval_forgetting_increase" in r and r["step"] == summary["steps"]]
    assert last and last[0]["eval_forgetting_increase"] > 0.01


def test_own_data_drops_the_demo_forgetting_text_and_takes_its_own(tmp_path):
    data = REPO / "tests" / "fixtures" / "data"
    assert compose_config(f"run.dir={tmp_path}", f"data.path={data / 'alpaca.json'}").eval.forgetting_path is None
    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"Plain sentence number {i} about nothing."}) + "\n"
                               for i in range(16)))
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", f"data.path={data / 'alpaca.json'}", "data.val_ratio=0.2",
                     f"eval.forgetting_path={general}", "train.max_steps=2", "train.micro_batch_size=2",
                     "train.global_batch_size=2", "eval.generate_samples=0",
                     "logger.progress=false", "logger.plot=false", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "forgetting_loss" in read_summary(run_dir)["eval_after"]


@pytest.mark.parametrize("override,fragments", [
    ("eval.forgetting_path=/no/such/file.txt", ["eval.forgetting_path", "does not exist"]),
    ("eval.forgetting_format=yaml", ["eval.forgetting_format", "'yaml' is not one of"]),
    ("eval.max_forgetting=-1", ["eval.max_forgetting", ">= 0"]),
    ("regularize.ewc_lambda=10", ["regularize.fisher_path", "general data"]),
    ("regularize.l2_lambda=-1", ["regularize.l2_lambda", ">= 0"]),
    ("regularize.fisher_path=/nonexistent.txt", ["regularize.fisher_path", "does not exist"]),
])
def test_bad_forgetting_settings_are_one_line(override, fragments, tmp_path):
    assert_one_line_error(run_cli("train", f"run.dir={tmp_path / 'run'}", override, timeout=60), *fragments)
    assert not (tmp_path / "run").exists()


def test_the_demo_with_replay_keeps_the_demo_and_adds_its_replay_and_epochs(tmp_path):
    config = compose_config(f"run.dir={tmp_path}", "experiment=demo-replay")
    assert config.data.replay.path.endswith("demo-facts/replay.txt") and config.data.replay.ratio == 0.2
    assert config.train.epochs == 10 and config.optim.lr == 1e-3 and config.data.max_seq_len == 104
    assert config.eval.forgetting_path.endswith("demo-facts/general.txt") and config.eval.generate_samples == 60


def test_the_weight_penalties_are_refused_where_weights_are_sharded(tmp_path):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "regularize.l2_lambda=1", "strategy=fsdp", timeout=60)
    assert_one_line_error(result, "regularize.l2_lambda", "strategy=single or ddp")


def test_a_bad_record_in_the_fisher_data_is_refused_before_the_model_loads(tmp_path):
    bad = tmp_path / "general.jsonl"
    bad.write_text('{"messages": [oops\n')
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "regularize.ewc_lambda=10",
                     f"regularize.fisher_path={bad}", "regularize.fisher_format=chat", timeout=300)
    # Read with the other data files (after the training data's report line), before the model is built.
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert [line for line in lines if line.startswith("trainer:")] == [lines[-1]], lines
    assert lines[-1].startswith("trainer: ") and f"{bad}:1: malformed JSON" in lines[-1], lines
    assert "trainable parameters" not in result.stderr  # logged once the model is built
    assert not (tmp_path / "run").exists()


def test_max_forgetting_needs_data_to_watch(tmp_path):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "eval.forgetting_path=null", "eval.max_forgetting=0.1",
                     timeout=60)
    assert_one_line_error(result, "eval.max_forgetting", "eval.forgetting_path")


REGULARIZED = ("regularize.ewc_lambda=1000", "regularize.l2_lambda=10", f"regularize.fisher_path={REPLAY_TEXT}",
               "regularize.fisher_samples=8", "checkpoint.every_n_steps=3", "eval.generate_samples=0",
               "eval.max_batches=1", "logger.every_n_steps=1", "logger.progress=false", "logger.plot=false")


def test_ewc_and_l2_penalties_are_logged_from_zero_and_a_resume_keeps_their_anchor(tmp_path):
    """The penalties start at 0 (the weights are their own anchor at step 1), grow as the weights move, are logged
    apart from the loss, and a resumed run penalises the distance from the same anchor: its steps equal the
    uninterrupted run's."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    result = run_cli("train", f"run.dir={whole}", "train.max_steps=6", "eval.every_n_steps=3", *REGULARIZED,
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "regularize: EWC lambda 1000, Fisher over 8 records" in result.stderr, result.stderr[-2000:]
    records = {r["step"]: r for r in read_metrics(whole) if "loss" in r}
    assert records[1]["ewc_penalty"] == 0.0 and records[1]["l2_penalty"] == 0.0
    assert 0 < records[3]["ewc_penalty"] < records[6]["ewc_penalty"] and records[6]["l2_penalty"] > 0
    assert (whole / "anchor.safetensors").exists()

    # Preempted as the evaluation at step 3 begins (a real SIGTERM, trainer/faults.py): checkpointed there, exit 85.
    first = run_cli("train", f"run.dir={cut}", "train.max_steps=6", "eval.every_n_steps=3", *REGULARIZED,
                    env={"TRAINER_SIGNAL_AT": "eval-3:SIGTERM"}, timeout=600)
    assert first.returncode == 85 and read_summary(cut)["steps"] == 3, first.stderr[-3000:]
    result = run_cli("train", f"run.dir={cut}", "train.max_steps=6", "eval.every_n_steps=3", *REGULARIZED,
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stderr and "Fisher over" not in result.stderr  # loaded, not estimated again
    resumed = {r["step"]: r for r in read_metrics(cut) if "loss" in r}
    for step in (4, 5, 6):
        for key in ("loss", "ewc_penalty", "l2_penalty"):
            assert resumed[step][key] == records[step][key], (step, key)
