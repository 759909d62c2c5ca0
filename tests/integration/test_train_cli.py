"""The whole recipe through the real `trainer train` CLI on the embedded tiny model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from tests.conftest import QUICK, assert_one_line_error, read_metrics, read_summary, run_cli, train_losses

RUN_DIR_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "loss_curve.png", "final", "checkpoints"}


def _train(run_dir: Path, *overrides: str):
    result = run_cli("train", f"run.dir={run_dir}", *QUICK, *overrides)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def _generate(model, tokenizer, prompt: str) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


@pytest.mark.parametrize("peft", ["none", "lora"])
def test_train_writes_the_run_dir_and_a_loadable_final_model(run_dir, peft):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _train(run_dir, f"peft={peft}", "checkpoint.every_n_steps=3")
    assert RUN_DIR_FILES <= {p.name for p in run_dir.iterdir()}
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 6
    for key in ("train_loss_first", "train_loss_last", "tokens_per_second", "peak_memory_bytes", "final_dir"):
        assert summary[key], key
    assert summary["eval_before"].keys() == summary["eval_after"].keys() >= {"loss", "perplexity", "exact_match"}
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"step", "loss", "lr", "grad_norm", "tokens_per_second"} <= r.keys() for r in steps)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000006"]

    final = Path(summary["final_dir"])
    # Weights are written with the user's umask (safetensors' own files are 0600): the test runs under its own umask.
    umask = os.umask(0)
    os.umask(umask)
    for weights in final.glob("*.safetensors"):
        assert weights.stat().st_mode & 0o777 == 0o666 & ~umask, (weights, oct(weights.stat().st_mode))
    tokenizer = AutoTokenizer.from_pretrained(final)
    if peft == "lora":
        from peft import PeftModel

        assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
        base = AutoModelForCausalLM.from_pretrained(json.loads((final / "adapter_config.json").read_text())
                                                    ["base_model_name_or_path"])
        model = PeftModel.from_pretrained(base, final)
    else:
        assert (final / "model.safetensors").is_file()
        model = AutoModelForCausalLM.from_pretrained(final)
    model.eval()
    assert isinstance(_generate(model, tokenizer, "The"), str)
    # The saved model is the trained one: its loss on a validation batch matches the run's final eval.
    assert torch.isfinite(next(model.parameters())).all()


def test_same_seed_gives_the_same_losses_and_another_seed_does_not(tmp_path):
    _train(tmp_path / "a", "seed=3", "eval.generate_samples=0")
    _train(tmp_path / "b", "seed=3", "eval.generate_samples=0")
    _train(tmp_path / "c", "seed=4", "eval.generate_samples=0")
    a, b, c = (train_losses(tmp_path / name) for name in "abc")
    assert a == b
    assert a != c


def test_the_model_trains_in_training_mode_so_dropout_acts(tmp_path):
    # from_pretrained returns a model in eval mode; trained in it, LoRA's dropout (and transformers' gradient
    # checkpointing) would silently do nothing. The adapter starts at zero, so the first losses agree and the
    # dropout shows from the second step on.
    lora = ("peft=lora", "seed=3", "train.max_steps=3", "eval.generate_samples=0")
    _train(tmp_path / "none", *lora, "peft.dropout=0")
    _train(tmp_path / "half", *lora, "peft.dropout=0.5")
    without, with_dropout = train_losses(tmp_path / "none"), train_losses(tmp_path / "half")
    assert without[1] == with_dropout[1]
    assert without[3] != pytest.approx(with_dropout[3], rel=1e-4)


def test_early_stopping_stops_when_eval_loss_stops_improving(run_dir):
    # A learning rate of zero cannot improve the eval loss, so patience 2 ends the run at the second eval.
    _train(run_dir, "optim.lr=1e-12", "train.max_steps=20", "eval.every_n_steps=2", "eval.early_stopping_patience=2",
           "eval.generate_samples=0", "eval.early_stopping_min_delta=0.001")
    summary = read_summary(run_dir)
    assert summary["status"] == "early_stopped"
    assert summary["steps"] == 4


def test_resume_auto_continues_from_the_last_committed_checkpoint(tmp_path):
    import shutil

    full, interrupted = tmp_path / "full", tmp_path / "interrupted"
    common = ("peft=none", "train.max_steps=6", "checkpoint.every_n_steps=3", "checkpoint.keep_last=0",
              "eval.generate_samples=0")
    _train(full, *common)
    # The state a crash after step 4 leaves: config, metrics, the committed step-3 checkpoint, and a step-6
    # checkpoint whose save never committed.
    interrupted.mkdir()
    shutil.copy(full / "config.yaml", interrupted / "config.yaml")
    shutil.copytree(full / "checkpoints" / "step-000003", interrupted / "checkpoints" / "step-000003")
    shutil.copytree(full / "checkpoints" / "step-000006", interrupted / "checkpoints" / "step-000006")
    (interrupted / "checkpoints" / "step-000006" / "COMMITTED").unlink()
    result = run_cli("train", f"run.dir={interrupted}", *QUICK, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "skipping checkpoint" in result.stderr and "not committed" in result.stderr
    assert "resumed from" in result.stderr and "step-000003" in result.stderr
    losses_full, losses_resumed = train_losses(full), train_losses(interrupted)
    assert sorted(losses_resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert losses_resumed[step] == losses_full[step]


def test_bad_data_file_is_one_line_naming_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "output": }\n')
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", f"data.path={bad}", "data.val_path=null", *QUICK)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"{bad}:2:" in result.stderr.strip().splitlines()[-1]


def test_a_second_round_starts_from_an_existing_adapter(tmp_path):
    """peft.init_from continues an adapter: the new run's evaluation before training is the first run's after."""
    lora = ("peft=lora", "peft.r=8", "eval.generate_samples=0", "train.max_steps=3")
    _train(tmp_path / "first", *lora)
    _train(tmp_path / "second", *lora, f"peft.init_from={tmp_path / 'first'}", "optim.warmup_steps=1")
    first, second = read_summary(tmp_path / "first"), read_summary(tmp_path / "second")
    assert second["eval_before"]["loss"] == pytest.approx(first["eval_after"]["loss"], rel=1e-5)
    assert second["eval_before"]["loss"] < first["eval_before"]["loss"]
    refused = run_cli("train", f"run.dir={tmp_path / 'third'}", *QUICK, "peft=lora", "peft.r=16",
                      f"peft.init_from={tmp_path / 'first'}")
    assert_one_line_error(refused, "peft.r", "r=8")


def test_evaluation_and_checkpoints_every_epoch(tmp_path):
    # The demo's rows make an epoch of a few global batches; two epochs end two evaluations and two checkpoints.
    run_dir = tmp_path / "run"
    _train(run_dir, "train.max_steps=0", "train.epochs=2", "eval.every_epoch=true", "checkpoint.every_epoch=true",
           "checkpoint.keep_last=0", "eval.generate_samples=0", "train.global_batch_size=32")
    steps = sorted(train_losses(run_dir))
    per_epoch = len(steps) // 2
    evals = [r["step"] for r in read_metrics(run_dir) if "eval_loss" in r]
    assert per_epoch in evals and len(steps) in evals  # after the first epoch; the last one ends the run
    saved = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert saved == [f"step-{per_epoch:06d}", f"step-{len(steps):06d}"]
    assert all("peak_memory_gib" in r for r in read_metrics(run_dir) if "loss" in r)


def test_capped_epochs_evaluate_and_save_each_and_a_profile_is_written(tmp_path):
    """train.max_steps_per_epoch=2: an epoch of two steps (evaluated and saved per epoch); logger.profile_steps=2
    profiles steps 2-3 into a trace and an operator table."""
    run_dir = tmp_path / "run"
    _train(run_dir, "train.max_steps=0", "train.epochs=2", "train.max_steps_per_epoch=2", "eval.every_epoch=true",
           "checkpoint.every_epoch=true", "checkpoint.keep_last=0", "eval.generate_samples=0",
           "logger.profile_steps=2")
    logged = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in logged] == [(1, 0), (2, 0), (3, 1), (4, 1)]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002", "step-000004"]
    assert [r["step"] for r in read_metrics(run_dir) if "eval_loss" in r] == [0, 2, 4]
    trace = json.loads((run_dir / "profile" / "rank0.trace.json").read_text())
    assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert "aten::mm" in (run_dir / "profile" / "rank0-top-ops.txt").read_text()
