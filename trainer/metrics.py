"""Throughput and peak memory (the loss-curve plot is trainer/plots.py)."""

from __future__ import annotations


class Throughput:
    """Tokens per second of training steps alone, plus a steady-state figure that skips warm-up steps."""

    def __init__(self, warmup_steps: int = 2):
        self.warmup_steps = warmup_steps
        self.steady_tokens = 0
        self.steady_seconds = 0.0
        self.steps = 0

    def update(self, tokens: int, seconds: float) -> float:
        self.steps += 1
        if self.steps > self.warmup_steps:
            self.steady_tokens += tokens
            self.steady_seconds += seconds
        return tokens / max(seconds, 1e-9)

    @property
    def steady_tokens_per_second(self) -> float | None:
        return self.steady_tokens / self.steady_seconds if self.steady_seconds else None


def device_peak_bytes(device) -> int | None:
    """GPU: the most device memory this process held, as the card sees it: the allocator's reserved peak (what it
    took from the driver, fragmentation included) plus what the driver holds beside it now (the CUDA context, NCCL's
    buffers), the figure `trainer plan`'s total must cover. Another process on the same card counts too (the driver
    reports the card's free memory). None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    beside_allocator = total - free - torch.cuda.memory_reserved(device)
    return int(beside_allocator + torch.cuda.max_memory_reserved(device))


def peak_memory_bytes(device) -> int:
    """GPU: the allocator's peak since the last reset (the recipe resets it at every step, so a step's metrics show
    that step's peak); CPU: the process's peak resident set so far (what the OS had to give us; it cannot be reset)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB
