"""loss_curve.png: what a person looks at first after a run, drawn from metrics.jsonl.

Loss on a log scale when it spans a wide range (the first steps' loss would otherwise flatten the tail into a line),
the raw per-step loss faint with a smoothed line over it, evaluations as markers, and beside it the learning rate
and, when the run measures it, the loss on the forgetting data. The run's name and final figures are the title.
"""

from __future__ import annotations

import json
import os

LOG_SCALE_RATIO = 3.0  # max/min loss above which the loss axis is logarithmic


def _read(metrics_path: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {"loss": [], "lr": [], "eval_loss": [], "eval_forgetting_loss": []}
    with open(metrics_path) as fh:
        for line in fh:
            record = json.loads(line)
            for key, points in series.items():
                value = record.get(key)
                if isinstance(value, (int, float)) and value == value:  # skips NaN
                    points.append((record["step"], float(value)))
    return series


def smoothed(values: list[float], window_fraction: float = 0.05) -> list[float]:
    """An exponential moving average whose span is about 5% of the run (at least 1 step), bias-corrected at the
    start so that the first points are not pulled towards zero."""
    span = max(1.0, window_fraction * len(values))
    decay = 1.0 - 2.0 / (span + 1.0)
    out, average, weight = [], 0.0, 0.0
    for value in values:
        average = decay * average + (1 - decay) * value
        weight = decay * weight + (1 - decay)
        out.append(average / weight)
    return out


def plot_loss_curve(metrics_path: str, out_path: str, title: str | None = None) -> str | None:
    """Draw OUT_PATH (written atomically) from METRICS_PATH; None if there is nothing to draw."""
    if not os.path.exists(metrics_path):
        return None
    series = _read(metrics_path)
    if not series["loss"] and not series["eval_loss"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = loss_figure(series, title)
    tmp = out_path + ".tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_path)
    return out_path


def loss_figure(series: dict[str, list[tuple[int, float]]], title: str | None = None):
    """The matplotlib Figure of loss_curve.png for SERIES (as read from metrics.jsonl)."""
    import matplotlib.pyplot as plt

    train, evals = series["loss"], series["eval_loss"]
    side = [key for key in ("lr", "eval_forgetting_loss") if series[key]]
    fig, axes = plt.subplots(1, 1 + len(side), figsize=(7 + 3.5 * len(side), 4), dpi=100, squeeze=False,
                             gridspec_kw={"width_ratios": [2] + [1] * len(side)})
    loss_ax = axes[0][0]
    if train:
        steps, losses = zip(*train)
        loss_ax.plot(steps, losses, linewidth=0.8, alpha=0.35, color="C0", label="train loss (per step)")
        loss_ax.plot(steps, smoothed(list(losses)), linewidth=1.6, color="C0", label="train loss (smoothed)")
    if evals:
        loss_ax.plot(*zip(*evals), "o:", color="C1", markersize=6, linewidth=0.8, alpha=0.9, label="eval loss")
    values = [v for _, v in train + evals if v > 0]
    if values and max(values) / min(values) > LOG_SCALE_RATIO:
        loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("loss (nats/token)")
    loss_ax.grid(alpha=0.3, which="both")
    loss_ax.legend(fontsize=8)
    for ax, key in zip(axes[0][1:], side):
        ax.plot(*zip(*series[key]), "o-" if key.startswith("eval_") else "-", color="C2", markersize=4)
        ax.set_xlabel("step")
        ax.set_title({"lr": "learning rate", "eval_forgetting_loss": "forgetting-data loss"}[key], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(_title(title, train, evals), fontsize=10)
    fig.tight_layout()
    return fig


def _title(name: str | None, train: list, evals: list) -> str:
    parts = [name] if name else []
    if train:
        parts.append(f"train loss {train[0][1]:.4g} -> {train[-1][1]:.4g} in {train[-1][0]} steps")
    if evals:
        parts.append(f"eval loss {evals[-1][1]:.4g}")
    return "  |  ".join(parts)
