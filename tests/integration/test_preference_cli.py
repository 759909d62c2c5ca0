"""Preference tuning through the CLI on the embedded preference demo (conf/experiment/demo-dpo.yaml): every method
trains and logs its metrics, DPO resumes exactly with the reference log-probs its first start recorded, the adapter
exports like an SFT one, and a preference objective on data without pairs is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import FIXTURES, assert_one_line_error, read_metrics, read_summary, run_cli, train_losses

pytestmark = pytest.mark.slow

FAST = ("experiment=demo-dpo", "train.max_steps=4", "train.micro_batch_size=4", "train.global_batch_size=8",
        "eval.max_batches=2", "logger.progress=false", "logger.plot=false", "peft.dropout=0")
PAIR_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
                "logps_rejected", "logps_accuracy")


def _train(run_dir: Path, *overrides: str):
    result = run_cli("train", f"run.dir={run_dir}", *FAST, *overrides, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.mark.parametrize("method", ["dpo", "ipo", "simpo", "orpo"])
def test_every_method_trains_pairs_and_logs_its_metrics(method, tmp_path):
    run_dir = tmp_path / method
    # ORPO with TRL's NLL term (prompt and answer); its default, answer only, is the unit tests'
    extra = ("objective.orpo_nll=sequence",) if method == "orpo" else ()
    result = _train(run_dir, f"objective.name={method}", *extra)
    assert "preference pairs" in result.stderr and f"objective: {method}" in result.stderr
    if method == "orpo":
        assert "NLL over the chosen prompts and answers" in result.stderr
    steps = [r for r in read_metrics(run_dir) if "loss" in r]  # training steps (eval records: eval_*)
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert all(key in record for key in PAIR_METRICS), record
        assert record["reward_margin"] == pytest.approx(record["rewards_chosen"] - record["rewards_rejected"],
                                                        abs=1e-6)
    if method in ("dpo", "ipo"):
        # The reference is the policy as training starts: step 1's loss is the methods' value at zero log-ratio.
        assert steps[0]["loss"] == pytest.approx(0.6931472 if method == "dpo" else 25.0, rel=1e-4)
        assert steps[0]["rewards_chosen"] == pytest.approx(0, abs=1e-6)
        assert (run_dir / "reference_logps.safetensors").is_file()
    else:
        assert not (run_dir / "reference_logps.safetensors").exists()  # reference-free
    summary = read_summary(run_dir)
    for split in ("eval_before", "eval_after"):
        assert 0 <= summary[split]["preference_accuracy"] <= 1 and 0 <= summary[split]["logps_accuracy"] <= 1
    assert (run_dir / "final" / "adapter_config.json").is_file()


def test_dpo_with_packed_answers_gives_the_unpacked_losses(tmp_path):
    """data.packing packs each micro batch's answers into shared rows; attention and positions stay per answer, so
    the per-answer log-probs, and the losses, are the unpacked ones."""
    _train(tmp_path / "padded", "objective.name=dpo")
    result = _train(tmp_path / "packed", "objective.name=dpo", "data.packing=true")
    assert "answers share rows of <= 64 tokens" in result.stderr
    packed, padded = train_losses(tmp_path / "packed"), train_losses(tmp_path / "padded")
    assert packed[1] == pytest.approx(0.6931472, rel=1e-5) and sorted(packed) == [1, 2, 3, 4]
    for step, loss in padded.items():
        assert packed[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    assert read_summary(tmp_path / "packed")["eval_after"]["preference_accuracy"] == pytest.approx(
        read_summary(tmp_path / "padded")["eval_after"]["preference_accuracy"], abs=1e-6)


KTO_METRICS = ("rewards_chosen", "rewards_rejected", "reward_margin", "preference_accuracy", "logps_chosen",
               "logps_rejected", "kl")


def test_kto_trains_the_pairs_as_labelled_answers_and_logs_its_metrics(tmp_path):
    run_dir = tmp_path / "kto"
    result = _train(run_dir, "objective.name=kto", "objective.undesirable_weight=1.5")
    assert "360 KTO answers (180 desirable, 180 undesirable)" in result.stderr  # the demo's 180 pairs, unpaired
    assert "objective: kto" in result.stderr
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for record in steps:
        assert all(key in record for key in KTO_METRICS) and "logps_accuracy" not in record, record
    # At step 1 the policy is its reference (log-ratios and KL 0): each answer's loss is its weight x (1 - 1/2),
    # 0.5 desirable and 0.75 undesirable, so the mean over the batch's 8 answers is 0.5 + 0.25 x (undesirable / 8).
    assert steps[0]["kl"] == pytest.approx(0, abs=1e-6)
    undesirable = (steps[0]["loss"] - 0.5) * 32
    assert undesirable == pytest.approx(round(undesirable), abs=1e-4) and 0 <= round(undesirable) <= 8
    assert steps[-1]["kl"] >= 0 and steps[-1]["rewards_chosen"] != 0
    assert (run_dir / "reference_logps.safetensors").is_file()
    summary = read_summary(run_dir)
    assert 0 <= summary["eval_after"]["preference_accuracy"] <= 1 and "kl" in summary["eval_after"]


# make test resumes DPO on two ZeRO-3 ranks (tests/distributed/test_preference_strategies.py); this one process's
# case runs in make test-all
@pytest.mark.extended
def test_dpo_resumes_exactly_from_a_checkpoint_with_its_recorded_reference(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "checkpoint.every_n_steps=2", "checkpoint.keep_last=0")
    expected = train_losses(run_dir)
    reference = (run_dir / "reference_logps.safetensors").read_bytes()
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    shutil.rmtree(run_dir / "final")
    result = _train(run_dir, "checkpoint.every_n_steps=2", "checkpoint.keep_last=0")
    assert "resumed from" in result.stderr and "step-000002" in result.stderr
    assert "reference log-probs of" not in result.stderr  # loaded, not recomputed from the trained model
    assert (run_dir / "reference_logps.safetensors").read_bytes() == reference
    assert train_losses(run_dir) == expected


def test_dpo_fine_tunes_every_weight_without_peft_against_its_recorded_reference(tmp_path):
    """Full fine-tuning DPO: the reference is the whole starting model, still one pass and no second copy; every
    weight may move, and final/ is a whole model."""
    run_dir = tmp_path / "full"
    fast = [arg for arg in FAST if not arg.startswith("peft.")]
    result = run_cli("train", f"run.dir={run_dir}", *fast, "objective.name=dpo", "peft=none", "optim.lr=1e-5",
                     timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "reference log-probs of" in result.stderr and (run_dir / "reference_logps.safetensors").is_file()
    steps = [r for r in read_metrics(run_dir) if "loss" in r]
    assert steps[0]["loss"] == pytest.approx(0.6931472, rel=1e-4)  # the reference is the starting policy
    assert steps[-1]["reward_margin"] != 0
    config = json.loads((run_dir / "final" / "config.json").read_text())
    assert config["model_type"] == "llama" and not (run_dir / "final" / "adapter_config.json").exists()


def test_dpo_adapter_exports_merged_and_gguf_like_an_sft_one(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "train.max_steps=2")
    result = run_cli("export", str(run_dir / "final"), "--to", "merged", "--out", str(tmp_path / "merged"),
                     timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"
    # And for llama.cpp: the adapter as a GGUF LoRA adapter, read back with the gguf package's own reader.
    gguf = pytest.importorskip("gguf")
    out = tmp_path / "dpo-lora.gguf"
    result = run_cli("export", str(run_dir / "final"), "--to", "gguf", "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == "adapter"
    assert any(t.name.endswith("lora_a") for t in reader.tensors)


def test_a_preference_objective_on_data_without_pairs_is_a_one_line_error(tmp_path):
    alpaca = FIXTURES / "data" / "alpaca.json"
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "objective.name=dpo", f"data.path={alpaca}",
                     timeout=120)
    assert_one_line_error(result, str(alpaca), "no preference pairs", "objective=sft")


def test_data_check_of_a_preference_run_builds_the_pairs_it_will_train(tmp_path):
    result = run_cli("data", "check", "experiment=demo-dpo", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "data is usable: 180 training rows" in result.stdout
    assert "rejected answers are unused" not in result.stdout + result.stderr  # the SFT view's warning
    sft = run_cli("data", "check", "experiment=demo-dpo", "objective.name=sft", timeout=120)
    assert "rejected answers are unused" in sft.stdout + sft.stderr
