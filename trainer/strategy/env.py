"""Where a worker learns its rank, world size and master address: the one place that reads launcher variables.

torchrun and the deepspeed launcher set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; a plain
`srun python -m trainer.worker` sets only SLURM_* variables, from which the same values are derived.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _first_slurm_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST") or "127.0.0.1"
    import subprocess

    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30)
        return out.stdout.split()[0] if out.returncode == 0 and out.stdout.split() else nodelist
    except (OSError, subprocess.SubprocessError):
        return nodelist


def read_dist_env(environ: dict | None = None) -> DistEnv:
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun, deepspeed launcher, or a user's own launcher
        return DistEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)))
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", 1)) > 1:  # srun with one task per rank
        return DistEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                       env.get("MASTER_ADDR") or _first_slurm_host(), int(env.get("MASTER_PORT", 29500)))
    return DistEnv(0, 1, 0, "127.0.0.1", 29500)


def init_process_group(dist_env: DistEnv, timeout_s: float):
    """Join the process group on NCCL+CUDA when a GPU is present, else gloo+CPU; returns the device."""
    import torch
    import torch.distributed as dist

    if torch.cuda.is_available():
        device = torch.device("cuda", dist_env.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed would otherwise probe for accelerators
    if dist_env.distributed and not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", dist_env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(dist_env.master_port))
        timeout = timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=dist_env.rank, world_size=dist_env.world_size, timeout=timeout,
                                store=_store_for_this_attempt(dist_env, timeout))
    return device


def _store_for_this_attempt(dist_env: DistEnv, timeout: timedelta):
    """After a torchrun restart, a store whose keys are private to this attempt; else None (torch's default).

    torchrun's c10d rendezvous keeps one TCPStore for the whole job and hands it to every attempt's workers
    without a per-attempt prefix, so restarted workers can read the process-group addresses that the killed
    workers published and fail with "Connection refused" instead of meeting each other.
    """
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
    if restart == 0 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    import torch.distributed as dist

    shared = dist.TCPStore(dist_env.master_addr, dist_env.master_port, dist_env.world_size, is_master=False,
                           timeout=timeout)
    return dist.PrefixStore(f"trainer/attempt-{restart}", shared)


def all_reduce_sum(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor)


def all_reduce_max(value: float, device) -> float:
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        return value
    tensor = torch.tensor(float(value), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return float(tensor)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()


def destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
