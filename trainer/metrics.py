"""Throughput, peak memory and the loss-curve plot."""

from __future__ import annotations

import json
import os


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


def peak_memory_bytes(device) -> int:
    """GPU: the allocator's peak; CPU: the process's peak resident set (what the OS had to give us)."""
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def plot_loss_curve(metrics_path: str, out_path: str) -> str | None:
    """Train loss per step and eval loss per evaluation, from metrics.jsonl; None if nothing to draw."""
    if not os.path.exists(metrics_path):
        return None
    train, evals = [], []
    with open(metrics_path) as fh:
        for line in fh:
            record = json.loads(line)
            if "loss" in record:
                train.append((record["step"], record["loss"]))
            if "eval_loss" in record:
                evals.append((record["step"], record["eval_loss"]))
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path
