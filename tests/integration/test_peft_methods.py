"""Every PEFT method trains the embedded tiny model through the real CLI: the loss falls over 12 steps.

Each run also exercises one option or optimizer of issue 6, so that six runs cover them all: rsLoRA with the
attention preset, DoRA on the mlp preset with gradual unfreezing, QLoRA (NF4, double quantisation) with the paged
8-bit AdamW, IA3 with 8-bit AdamW and layer-wise LR decay, prompt tuning on packed rows, prefix tuning with the
paged 32-bit AdamW. Evaluation generates a couple of answers, which runs the virtual-token decoding path too.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses

STEPS = 12
SHORT = (f"train.max_steps={STEPS}", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
         "eval.generate_samples=2", "eval.max_new_tokens=4", "logger.progress=false", "logger.plot=false",
         "optim.warmup_ratio=0.0", "optim.scheduler=constant")

METHODS = {
    "lora": ("peft=lora", "peft.use_rslora=true", "peft.target_modules=attention", "optim.lr=5e-4"),
    "dora": ("peft=dora", "peft.target_modules=mlp", "optim.lr=1e-3", "optim.freeze.unfreeze_every_n_steps=3"),
    "qlora": ("peft=qlora", "peft.quant_type=nf4", "peft.double_quant=true", "optim=paged_adamw_8bit",
              "optim.lr=1e-3"),
    "ia3": ("peft=ia3", "optim=adamw_8bit", "optim.lr=1e-2", "optim.layer_lr_decay=0.8"),
    "prompt_tuning": ("peft=prompt_tuning", "peft.num_virtual_tokens=8", "optim.lr=3e-2"),
    "prefix_tuning": ("peft=prefix_tuning", "peft.num_virtual_tokens=8", "optim=paged_adamw_32bit", "optim.lr=1e-2"),
}
_TRAINABLE = re.compile(r"trainable parameters: ([\d,]+) of ([\d,]+)")


def train_method(run_dir: Path, method: str, *extra: str):
    result = run_cli("train", f"run.dir={run_dir}", *SHORT, *METHODS[method], *extra)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_method_trains_and_loss_falls(tmp_path, method):
    result = train_method(tmp_path / method, method)
    losses = [loss for _, loss in sorted(train_losses(tmp_path / method).items())]
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < first - 0.1, f"{method}: loss did not fall: {losses}"
    summary = read_summary(tmp_path / method)
    assert summary["status"] == "completed" and summary["peak_memory_bytes"] > 0
    trainable, total = (int(n.replace(",", "")) for n in _TRAINABLE.search(result.stdout + result.stderr).groups())
    assert 0 < trainable < total / 10  # parameter-efficient: a small share trains
    final = Path(summary["final_dir"])
    assert (final / "adapter_config.json").is_file() and (final / "adapter_model.safetensors").is_file()
    if method == "dora":
        log = result.stdout + result.stderr  # 4 layers: the top one first, then one more every 3 steps
        assert "gradual unfreezing at step 0: training decoder layers 3..3 and the head" in log
        assert "gradual unfreezing at step 9: training decoder layers 0..3 and the head" in log
    if method in ("lora", "qlora"):  # a LoRA adapter for llama.cpp, straight from the run dir
        _export_and_read_back(tmp_path, method, "gguf", "adapter")
    if method in ("dora", "ia3"):  # merged into the base, then one GGUF file
        _export_and_read_back(tmp_path, method, "gguf-model", "model")
    print(f"\n{method}: trainable {trainable:,} of {total:,}; peak memory {summary['peak_memory_bytes'] / 2**20:.0f} "
          f"MiB; loss {losses[0]:.3f} -> {losses[-1]:.3f}; {summary['wall_seconds']} s")


def _export_and_read_back(tmp_path: Path, method: str, to: str, gguf_type: str) -> None:
    import gguf

    out = tmp_path / f"{method}.gguf"
    result = run_cli("export", str(tmp_path / method), "--to", to, "--out", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.type"].contents() == gguf_type
    assert any(t.name.startswith("blk.0.") for t in reader.tensors)
