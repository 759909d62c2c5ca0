"""Strategy plumbing that needs no processes: the DeepSpeed JSON, its overrides, and reading rank variables."""

from __future__ import annotations

import pytest

from tests.conftest import compose_config
from trainer.errors import ConfigError
from trainer.strategy.deepspeed import build_deepspeed_config
from trainer.strategy.env import read_dist_env


def _ds(tmp_path, *overrides):
    config = compose_config(f"run.dir={tmp_path}", *overrides)
    return build_deepspeed_config(config.strategy, config.train, config.optim.max_grad_norm,
                                  config.launcher.world_size)


def test_deepspeed_json_is_derived_from_our_config(tmp_path):
    ds = _ds(tmp_path, "strategy=zero3", "launcher.nproc_per_node=2", "train.micro_batch_size=4",
             "train.global_batch_size=32", "train.precision=bf16", "optim.max_grad_norm=0.5")
    assert ds["train_batch_size"] == 32
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 4  # 32 / (4 x 2 ranks)
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in ds["zero_optimization"]


def test_offload_blocks_and_nvme_path(tmp_path):
    ds = _ds(tmp_path, "strategy=zero3_offload")
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["zero_optimization"]["offload_param"]["device"] == "cpu"
    with pytest.raises(ConfigError, match="strategy.nvme_path"):
        compose_config(f"run.dir={tmp_path}", "strategy=zero3", "strategy.offload_param=nvme")
    with pytest.raises(ConfigError, match="strategy.offload_param"):
        compose_config(f"run.dir={tmp_path}", "strategy=zero2", "strategy.offload_param=cpu")


def test_user_overrides_merge_and_conflicts_name_both_sides(tmp_path):
    ds = _ds(tmp_path, "strategy=zero2", "+strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size=500000000")
    assert ds["zero_optimization"]["reduce_bucket_size"] == 500000000
    assert ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ConfigError) as err:
        _ds(tmp_path, "strategy=zero2", "train.global_batch_size=32",
            "+strategy.deepspeed_overrides.train_batch_size=64")
    message = str(err.value)
    assert "strategy.deepspeed_overrides.train_batch_size" in message and "train.global_batch_size" in message
    assert "64" in message and "32" in message


def test_rank_variables_from_torchrun_or_slurm():
    torchrun = read_dist_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "node0",
                              "MASTER_PORT": "1234"})
    assert (torchrun.rank, torchrun.world_size, torchrun.local_rank, torchrun.master_addr, torchrun.master_port) == (
        3, 8, 1, "node0", 1234)
    slurm = read_dist_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_LOCALID": "2", "MASTER_ADDR": "n1"})
    assert (slurm.rank, slurm.world_size, slurm.local_rank, slurm.master_addr) == (5, 6, 2, "n1")
    alone = read_dist_env({})
    assert (alone.rank, alone.world_size, alone.distributed) == (0, 1, False)


def test_single_strategy_with_several_processes_is_rejected(tmp_path):
    with pytest.raises(ConfigError, match="strategy"):
        compose_config(f"run.dir={tmp_path}", "strategy=single", "launcher.nproc_per_node=2")
    with pytest.raises(ConfigError, match="train.precision"):
        compose_config(f"run.dir={tmp_path}", "strategy=fsdp", "train.precision=fp16")
