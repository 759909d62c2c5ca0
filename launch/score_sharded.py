"""`trainer eval --nproc-per-node N`: the targets sharded over N ranks with FSDP2, scored as one process scores them.

The command starts itself again under torchrun (gloo on CPU, NCCL on GPUs) after the arguments and data have been
checked; each rank loads the targets, FSDP2 shards every decoder layer and the root (the training strategy's own
`setup`, with rank 0's weights broadcast), and trainer/evaluate.py's rank-sharing loss and generation run as they do
in training: every rank takes its share of the batches, the sums are all-reduced and the answers gathered in order.
Only rank 0 prints and writes the report.
"""

from __future__ import annotations

import os
import subprocess
import sys


def is_worker() -> bool:
    return "RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(argv: list[str], nproc: int) -> int:
    """This command on `nproc` ranks of this machine; their exit code (a failed rank ends them all)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--module", "trainer.cli", "eval", *argv]
    # The ranks share this machine's cores (torchrun would otherwise set 1 thread each, with a banner saying so).
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    env = {"OMP_NUM_THREADS": str(max(1, cores // nproc)), **os.environ}
    return subprocess.run(command, env=env).returncode


def shard(model):
    """(sharded model, strategy) over the ranks torchrun started."""
    from trainer.config.schema import FSDPStrategyConfig, OptimConfig, TrainConfig
    from trainer.strategy.fsdp import FSDPStrategy

    strategy = FSDPStrategy(FSDPStrategyConfig(), TrainConfig(precision="fp32"), OptimConfig())
    if not strategy.is_main:  # one table, one report: the other ranks compute and stay quiet
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 -- for the life of the process
    sharded, _ = strategy.setup(lambda **_: model, lambda _model: None)
    return sharded, strategy
