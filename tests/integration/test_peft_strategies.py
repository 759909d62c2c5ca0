"""QLoRA across strategies on 2 gloo ranks: FSDP2 (also with CPU offload) and ZeRO-3 shard the 4-bit base (stored as
bf16) and train it.

Both start from the same weights and batches, so their first losses agree (bf16 compute; later steps drift apart by
rounding), and the loss falls. The combinations that cannot work are refused in tests/unit/test_peft_config.py.
"""

from __future__ import annotations

import pytest

from tests.conftest import read_summary, run_cli, train_losses

# Dropout off: the two engines are compared step for step, and dropout draws need not line up between them.
QLORA_SHARDED = ("peft=qlora", "peft.dropout=0", "peft.quant_storage=bf16", "train.precision=bf16",
                 "launcher.nproc_per_node=2",
                 "train.max_steps=6", "train.micro_batch_size=4", "train.global_batch_size=8", "optim.lr=2e-3",
                 "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false")


@pytest.mark.slow
@pytest.mark.distributed
def test_qlora_trains_under_fsdp2_and_zero3_and_with_fsdp2_cpu_offload(tmp_path):
    losses = {}
    runs = {"fsdp": ("strategy=fsdp",), "zero3": ("strategy=zero3",),
            # the Answer.AI / PEFT 70B-on-2x24GB recipe: FSDP2 offloads the 4-bit shards and the optimizer step
            "fsdp_offload": ("strategy=fsdp", "strategy.cpu_offload=true")}
    for strategy, chosen in runs.items():
        run_dir = tmp_path / strategy
        result = run_cli("train", f"run.dir={run_dir}", *chosen, *QLORA_SHARDED, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        summary = read_summary(run_dir)
        assert summary["status"] == "completed" and summary["world_size"] == 2
        losses[strategy] = [loss for _, loss in sorted(train_losses(run_dir).items())]
        assert losses[strategy][-1] < losses[strategy][0] - 0.3, losses[strategy]
    assert losses["fsdp"][:2] == pytest.approx(losses["zero3"][:2], abs=1e-3)
    # Offload moves where the shards live and where the optimizer steps, not the arithmetic.
    assert losses["fsdp_offload"] == pytest.approx(losses["fsdp"], rel=1e-4)
