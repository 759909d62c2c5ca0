"""The local GPUs as nvidia-smi reports them, without importing torch (config errors must stay fast).

Used where a default depends on the hardware: `train.precision=auto` and the planner's GPU memory.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from functools import lru_cache

BF16_MIN_COMPUTE_CAPABILITY = 8.0  # Ampere (A100, RTX 30xx) and newer have bf16 tensor cores


@dataclass(frozen=True)
class Gpu:
    memory_gib: float
    compute_capability: float


@lru_cache(maxsize=1)
def local_gpus() -> tuple[Gpu, ...]:
    """Every local GPU, or () when there is none (or no driver to ask)."""
    if shutil.which("nvidia-smi") is None:
        return ()
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total,compute_cap", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        gpus = []
        for line in out.strip().splitlines():
            memory_mib, capability = (field.strip() for field in line.split(","))
            gpus.append(Gpu(float(memory_mib) / 1024, float(capability)))
    except (OSError, subprocess.SubprocessError, ValueError):
        return ()
    return tuple(gpus)


def local_gpu_memory_gib() -> float | None:
    """The smallest local GPU's memory, or None without a GPU."""
    gpus = local_gpus()
    return min(gpu.memory_gib for gpu in gpus) if gpus else None
