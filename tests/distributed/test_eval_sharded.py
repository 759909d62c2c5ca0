"""`trainer eval --nproc-per-node 2`: the base and an adapter sharded over two real gloo ranks (FSDP2) score as one
process scores them: the same loss, the same greedy answers in the same order, the same text metrics."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

pytestmark = pytest.mark.distributed

TINY = REPO / "trainer" / "assets" / "tiny-llama"
VAL = REPO / "trainer" / "assets" / "demo-facts" / "val.jsonl"


def _random_adapter(path: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(r=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(path)
    return path


def _scores(tmp_path: Path, adapter: Path, ranks: int) -> dict:
    report = tmp_path / f"scores-{ranks}.json"
    # 11 prompts in batches of 4: the ranks get 6 and 5, so one answers a stand-in in its last batch
    result = run_cli("eval", str(TINY), f"--adapter=lora={adapter}", "--base-too", "--data", str(VAL),
                     "--max-samples", "11", "--max-new-tokens", "8", "--batch-size", "4", "--json", str(report),
                     "--nproc-per-node", str(ranks), timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("metric ") == 1, "one table, from rank 0"
    return json.loads(report.read_text())["targets"]


def test_two_sharded_ranks_score_as_one_process(tmp_path):
    adapter = _random_adapter(tmp_path / "adapter")
    one, two = _scores(tmp_path, adapter, 1), _scores(tmp_path, adapter, 2)
    assert set(one) == set(two) == {"base", "lora"}
    for target in one:
        assert [a["answer"] for a in two[target]["answers"]] == [a["answer"] for a in one[target]["answers"]]
        assert [a["prompt"] for a in two[target]["answers"]] == [a["prompt"] for a in one[target]["answers"]]
        for key in ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL"):
            assert two[target]["metrics"][key] == one[target]["metrics"][key], (target, key)
        assert two[target]["metrics"]["loss"] == pytest.approx(one[target]["metrics"]["loss"], rel=1e-5)
    assert one["lora"]["metrics"]["loss"] != pytest.approx(one["base"]["metrics"]["loss"], rel=1e-3)


def test_harness_on_several_ranks_is_refused_in_one_line(tmp_path):
    result = run_cli("eval", str(TINY), "--harness", "x", "--nproc-per-node", "2", timeout=60)
    assert_one_line_error(result, "--harness runs in one process")
