"""`trainer export` through the real CLI: round trips to Hugging Face / PEFT dirs with the trained model's logits,
bounded memory, and one-line user errors. (Exports of 2-rank FSDP and ZeRO checkpoints: tests/distributed.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import assert_one_line_error, run_cli

COMMON = ("train.max_steps=4", "train.micro_batch_size=2", "train.global_batch_size=8", "eval.max_batches=1",
          "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "strategy=single",
          "checkpoint.every_n_steps=2", "checkpoint.keep_last=0")
ENV = {"OMP_NUM_THREADS": "1"}


def _train(run_dir: Path, *overrides: str) -> Path:
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, *overrides, env=ENV, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def _export(source: Path, to: str, out: Path, *extra: str):
    return run_cli("export", str(source), "--to", to, "--out", str(out), *extra, env=ENV, timeout=600)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("full") / "run", "peft=none")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    return _train(tmp_path_factory.mktemp("lora") / "run", "peft=lora")


def _logits(model):
    import torch

    ids = torch.tensor([[1, 17, 230, 5, 99, 400, 12, 2]])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def test_full_checkpoint_exports_to_sharded_hf_model_with_the_final_models_logits(full_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "hf"
    result = _export(full_run / "checkpoints" / "step-000004", "hf", out, "--max-shard-size", "4MB")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dcp checkpoint written by 1 rank" in result.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((out / s).is_file() for s in shards)
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    final = AutoModelForCausalLM.from_pretrained(full_run / "final", dtype=torch.float32)
    assert torch.equal(_logits(exported), _logits(final))  # step 4 is the last step: the final model, bit for bit
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("The zorp").input_ids == AutoTokenizer.from_pretrained(full_run / "final")("The zorp").input_ids


def test_run_dir_exports_its_final_model_and_dtype_converts(full_run, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    out = tmp_path / "bf16"
    result = _export(full_run, "hf", out, "--dtype", "bf16")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "the run's final model" in result.stdout
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    model = AutoModelForCausalLM.from_pretrained(out, dtype="auto")
    assert next(model.parameters()).dtype == torch.bfloat16
    reference = AutoModelForCausalLM.from_pretrained(full_run / "final", dtype=torch.bfloat16)
    assert torch.equal(_logits(model), _logits(reference))  # the same rounding of the same weights


def test_lora_checkpoint_exports_an_adapter_and_a_merged_model_with_the_trained_logits(lora_run, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    checkpoint = lora_run / "checkpoints" / "step-000004"
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert _export(checkpoint, "adapter", adapter).returncode == 0
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {p.name for p in adapter.iterdir()}
    config = json.loads((adapter / "adapter_config.json").read_text())
    base_path = config["base_model_name_or_path"]

    def base():
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)

    trained = _logits(PeftModel.from_pretrained(base(), lora_run / "final"))  # what the run itself saved
    assert torch.equal(_logits(PeftModel.from_pretrained(base(), adapter)), trained)

    result = _export(checkpoint, "merged", merged)
    assert result.returncode == 0, result.stderr[-3000:]
    merged_model = AutoModelForCausalLM.from_pretrained(merged)
    assert next(merged_model.parameters()).dtype == torch.float32  # auto: fp32, the base's dtype in this fp32 run
    assert not any("lora" in name for name, _ in merged_model.named_parameters())
    # W + BA computed once instead of Wx + B(Ax): equal up to float rounding.
    assert torch.allclose(_logits(merged_model), trained, atol=1e-4, rtol=1e-4)


def test_export_memory_is_bounded_by_the_largest_tensor_not_the_model(tmp_path):
    """A random-init Llama whose embedding (32000 x 512 fp32 = 62.5 MiB) is its largest tensor; the whole model
    is ~145 MiB of weights. The export's resident memory may grow by a few times that one tensor only."""
    from transformers import LlamaConfig

    from launch.compose import asset_path

    model_dir = tmp_path / "model-init"  # an architecture without weights: model.init=random builds from it
    LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=256,
                tie_word_embeddings=False).save_pretrained(model_dir)
    run_dir = _train(tmp_path / "run", "peft=none", f"model.path={model_dir}", "model.init=random",
                     f"model.tokenizer={asset_path('tiny-llama')}", "train.max_steps=1", "checkpoint.every_n_steps=1",
                     "train.global_batch_size=2", "train.micro_batch_size=2")
    result = _export(run_dir / "checkpoints" / "step-000001", "hf", tmp_path / "hf", "--max-shard-size", "100MB")
    assert result.returncode == 0, result.stderr[-3000:]
    growth, largest = map(float, re.search(r"(\d+) MiB above the start of the export \(largest tensor ([\d.]+) MiB",
                                           result.stdout).groups())
    total = sum(p.stat().st_size for p in (tmp_path / "hf").glob("*.safetensors")) / 2**20
    assert largest == pytest.approx(62.5, abs=0.1) and total > 2 * largest
    assert growth < 3.5 * largest, result.stdout


def test_user_errors_are_one_line_with_exit_code_2(full_run, lora_run, tmp_path):
    assert_one_line_error(_export(tmp_path / "missing", "hf", tmp_path / "o1"), "does not exist")
    assert_one_line_error(_export(full_run, "adapter", tmp_path / "o2"), "full fine-tune", "--to hf")
    assert_one_line_error(_export(lora_run / "checkpoints" / "step-000002", "hf", tmp_path / "o3"),
                          "--to adapter", "--to merged")
    uncommitted = tmp_path / "copy"
    shutil.copytree(full_run, uncommitted, ignore=shutil.ignore_patterns("final"))
    (uncommitted / "checkpoints" / "step-000002" / "COMMITTED").unlink()
    assert_one_line_error(_export(uncommitted / "checkpoints" / "step-000002", "hf", tmp_path / "o4"), "not committed")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert_one_line_error(_export(full_run, "hf", tmp_path / "taken"), "not empty")
    assert_one_line_error(run_cli("export", str(full_run), "--to", "gguf", "--out", str(tmp_path / "o5")), "--to")
