"""The run dir's contract through the real CLI (docs/checkpoints.md, "The run dir"): config.yaml is the run's
identity (a resume refuses changes that break the run and never rewrites it on a refusal), one job at a time holds
the run dir's lock, damaged history is never trained over, and generate/export answer unfinished or damaged runs
in one line. One LoRA run (2 steps, a checkpoint each) is shared; tests that change a run work on a copy."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, read_metrics, run_cli

COMMON = ("train.micro_batch_size=2", "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0",
          "logger.progress=false", "logger.plot=false", "strategy=single")
ENV = {"OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, *overrides, env=ENV, timeout=600)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("lora") / "run"
    _train(run_dir, "peft=lora", "train.max_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep_last=0")
    return run_dir


def _copy(run_dir: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


# ------------------------------------------------------------------------------------- 1. refused resumes
@pytest.mark.parametrize("override,key", [("peft=none", "peft.name=none"), ("peft.r=8", "peft.r=8"),
                                          ("seed=7", "seed=7"), ("data.path=FIXTURE", "data.path="),
                                          ("model.path=OTHER", "model.path=")])
def test_a_resume_that_would_break_the_run_is_refused_and_config_yaml_is_unchanged(lora_run, override, key,
                                                                                    tmp_path):
    if override == "data.path=FIXTURE":
        override = f"data.path={REPO / 'tests' / 'fixtures' / 'data' / 'alpaca.json'}"
    if override == "model.path=OTHER":  # another base: the same files under another name still count as another
        other = tmp_path / "other-base"
        shutil.copytree(REPO / "trainer" / "assets" / "tiny-llama", other)
        override = f"model.path={other}"
    before = (lora_run / "config.yaml").read_bytes()
    result = run_cli("train", f"run.dir={lora_run}", *COMMON, "peft=lora", "train.max_steps=3", override, env=ENV,
                     timeout=300)
    if override.startswith("model.path="):  # the embedded demo's data under another model is warned about first
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        result.stderr = result.stderr.strip().splitlines()[-1]
    assert_one_line_error(result, "config.yaml", key, "a resume cannot change", "another run.dir")
    assert (lora_run / "config.yaml").read_bytes() == before
    assert not (lora_run / "resume_history.jsonl").exists()


def test_after_a_refused_resume_export_writes_the_trained_adapter_and_refuses_hf(lora_run, tmp_path):
    assert_one_line_error(run_cli("train", f"run.dir={lora_run}", *COMMON, "peft.r=8", env=ENV, timeout=300),
                          "peft.r=8")
    out = tmp_path / "adapter"
    result = run_cli("export", str(lora_run / "checkpoints" / "step-000002"), "--to", "adapter", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 16
    from safetensors import safe_open

    with safe_open(str(out / "adapter_model.safetensors"), framework="pt") as handle:
        shapes = {handle.get_slice(k).get_shape()[0] for k in handle.keys() if "lora_A" in k}
    assert shapes == {16}
    assert_one_line_error(run_cli("export", str(lora_run), "--to", "hf", "--out", str(tmp_path / "hf")),
                          "PEFT (lora)", "--to adapter")


def test_export_refuses_a_checkpoint_whose_tensors_disagree_with_the_config(lora_run, tmp_path):
    """A checkpoint written before checkpoints carried their config, read with a hand-edited config.yaml (r: 8)."""
    run_dir = _copy(lora_run, tmp_path)
    checkpoint = run_dir / "checkpoints" / "step-000002"
    (checkpoint / "run_config.yaml").unlink()
    marker = json.loads((checkpoint / "COMMITTED").read_text())
    for section in ("files", "crc32"):
        marker[section].pop("run_config.yaml")
    (checkpoint / "COMMITTED").write_text(json.dumps(marker))
    config = run_dir / "config.yaml"
    config.write_text(config.read_text().replace("  r: 16\n", "  r: 8\n"))
    result = run_cli("export", str(checkpoint), "--to", "adapter", "--out", str(tmp_path / "adapter"))
    assert_one_line_error(result, "do not match", "r=8", "lora_A", "[16,")
    assert not (tmp_path / "adapter").exists()


# ------------------------------------------------------------------------ 2. what a resume may change
def test_a_resume_may_change_lr_only_when_allowed_and_states_what_it_changed(lora_run, tmp_path):
    run_dir = _copy(lora_run, tmp_path)
    before = (run_dir / "config.yaml").read_text()
    refused = run_cli("train", f"run.dir={run_dir}", *COMMON, "peft=lora", "train.max_steps=3", "optim.lr=5e-3",
                      env=ENV, timeout=300)
    assert_one_line_error(refused, "optim.lr=0.005", "run.allow_changes=[optim.lr]")
    assert (run_dir / "config.yaml").read_text() == before

    result = _train(run_dir, "peft=lora", "train.max_steps=3", "checkpoint.every_n_steps=1", "checkpoint.keep_last=0",
                    "optim.lr=5e-3", "run.allow_changes=[optim.lr]")
    stated = next(line for line in result.stdout.splitlines() if line.startswith("resuming with changed settings"))
    # run.dir too: this copy's config.yaml named the dir it was copied from
    assert "optim.lr 0.001 -> 0.005, run.dir " in stated and "train.max_steps 2 -> 3" in stated, stated
    assert "resumed from" in result.stderr and "step-000002 at step 2" in result.stderr
    step3 = [r for r in read_metrics(run_dir) if r.get("step") == 3 and "lr" in r][-1]
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    from trainer.optim import lr_multiplier

    optim = SimpleNamespace(**OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))["optim"])
    assert step3["lr"] == pytest.approx(5e-3 * lr_multiplier(2, 3, optim))  # the new LR, on the new schedule
    history = [json.loads(line) for line in (run_dir / "resume_history.jsonl").read_text().splitlines()]
    assert history[-1]["changes"] == {"optim.lr": [0.001, 0.005], "run.dir": [str(lora_run), str(run_dir)],
                                      "train.max_steps": [2, 3]}
    after = OmegaConf.load(run_dir / "config.yaml")
    original = OmegaConf.load(lora_run / "config.yaml")
    assert after.optim.lr == 0.005 and after.peft == original.peft and after.data == original.data
    # The checkpoint written after the change carries the config it was trained with.
    assert OmegaConf.load(run_dir / "checkpoints" / "step-000003" / "run_config.yaml").optim.lr == 0.005
    assert OmegaConf.load(run_dir / "checkpoints" / "step-000002" / "run_config.yaml").optim.lr == 0.001


# ------------------------------------------------------------------------------------------------ 3. lock
def test_a_second_train_on_a_busy_run_dir_is_refused_and_a_killed_holder_does_not_block_the_resume(tmp_path):
    run_dir = tmp_path / "run"
    args = ["train", f"run.dir={run_dir}", *COMMON, "peft=none", "train.max_steps=200", "checkpoint.every_n_steps=1",
            "checkpoint.keep_last=1"]
    first = subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, env={**os.environ, "WANDB_MODE": "disabled", **ENV})
    try:
        deadline = time.monotonic() + 300
        while not list(run_dir.glob("checkpoints/step-*/COMMITTED")) and time.monotonic() < deadline:
            assert first.poll() is None, "the first run ended early"
            time.sleep(0.1)
        second = run_cli(*args, env=ENV, timeout=300)
        assert_one_line_error(second, f"run dir {run_dir} is in use by pid {first.pid}", "lock", "another run.dir")
        assert first.poll() is None  # untouched by the refused one
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    newest = max(int(p.parent.name[5:]) for p in run_dir.glob("checkpoints/step-*/COMMITTED"))
    result = _train(run_dir, "peft=none", f"train.max_steps={newest + 1}", "checkpoint.every_n_steps=1",
                    "checkpoint.keep_last=1")
    assert f"the previous holder (pid {first.pid}" in result.stderr and "is gone" in result.stderr
    assert f"step-{newest:06d} at step {newest}" in result.stderr
    assert (run_dir / "final").is_dir() and (run_dir / ".lock").read_text() == ""  # released at the end


# --------------------------------------------------------------------------------------- 5. damaged history
def test_every_checkpoint_damaged_is_refused_and_resume_never_sets_them_aside(tmp_path):
    run_dir = tmp_path / "run"
    overrides = ("peft=none", "train.max_steps=2", "checkpoint.every_n_steps=1", "checkpoint.keep_last=0")
    _train(run_dir, *overrides)
    for step in (1, 2):
        shard = run_dir / "checkpoints" / f"step-{step:06d}" / "state" / "__0_0.distcp"
        with open(shard, "r+b") as fh:
            fh.truncate(shard.stat().st_size // 2)
    metrics = (run_dir / "metrics.jsonl").read_text()
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, *overrides, env=ENV, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert "Traceback" not in result.stderr
    for fragment in ("no committed checkpoint can be loaded", "step-000002: state/__0_0.distcp has",
                     "step-000001: state/__0_0.distcp has", "resume=never"):
        assert fragment in last, last
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001", "step-000002"]
    assert (run_dir / "metrics.jsonl").read_text() == metrics  # nothing trained over them

    again = _train(run_dir, *overrides, "resume=never")
    assert "set " in again.stderr and "aside" in again.stderr
    aside = sorted(p.name for p in (run_dir / "checkpoints-set-aside").iterdir())
    assert aside == ["step-000001", "step-000002"]  # kept, not deleted
    assert sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMMITTED")) == [
        "step-000001", "step-000002"]  # the new timeline's own


# ---------------------------------------------------------------------------------- 7. generate and export
def test_generate_on_a_run_without_final_says_what_to_do(lora_run, tmp_path):
    run_dir = _copy(lora_run, tmp_path)
    shutil.rmtree(run_dir / "final")
    result = run_cli("generate", str(run_dir), "Where does the flunk live?")
    assert_one_line_error(result, "no final/", "step-000002", f"trainer train run.dir={run_dir}",
                          "--to adapter")


def test_a_truncated_final_adapter_is_one_line_naming_the_file(lora_run, tmp_path):
    run_dir = _copy(lora_run, tmp_path)
    weights = run_dir / "final" / "adapter_model.safetensors"
    with open(weights, "r+b") as fh:
        fh.truncate(weights.stat().st_size - 100)
    assert_one_line_error(run_cli("generate", str(run_dir), "Where does the flunk live?"), str(weights),
                          "truncated")
    assert_one_line_error(run_cli("export", str(run_dir), "--to", "adapter", "--out", str(tmp_path / "out")),
                          str(weights), "truncated")


def test_generate_refuses_an_adapter_whose_config_disagrees_with_its_tensors_in_one_line(lora_run, tmp_path):
    run_dir = _copy(lora_run, tmp_path)
    config_path = run_dir / "final" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["r"] = config["r"] // 2  # e.g. an adapter_config.json copied from another run
    config_path.write_text(json.dumps(config))
    assert_one_line_error(run_cli("generate", str(run_dir), "Where does the flunk live?"), str(run_dir / "final"),
                          "does not match its adapter_config.json", f"[{config['r']},")


def test_generate_refuses_a_model_whose_config_disagrees_with_its_weights_in_one_line(tmp_path):
    model_dir = tmp_path / "model"
    shutil.copytree(REPO / "trainer" / "assets" / "tiny-llama", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["intermediate_size"] *= 2
    (model_dir / "config.json").write_text(json.dumps(config))
    assert_one_line_error(run_cli("generate", str(model_dir), "Where does the flunk live?"), str(model_dir),
                          "do not match its config.json", "mlp")
