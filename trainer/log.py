"""Where metrics go: a progress line, metrics.jsonl, W&B, TensorBoard. Rank gating happens once, here.

`build_logger` returns a `NullLogger` on non-zero ranks, so the training loop never asks which rank it is.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

from trainer.config.schema import LoggerConfig

WANDB_ID_FILE = "wandb_run_id"


class NullLogger:
    def log_train(self, step: int, metrics: dict) -> None: ...
    def log_eval(self, step: int, metrics: dict) -> None: ...
    def log_samples(self, step: int, examples: list[dict]) -> None: ...
    def log_final_model(self, final_dir: str, kind: str) -> None: ...
    def progress(self, step: int, total: int, metrics: dict) -> None: ...
    def info(self, message: str) -> None: ...
    def close(self) -> None: ...


def _format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60:02d}:{rest % 60:02d}"


class ProgressLine:
    """`step 12/200 [6%] eta 01:40 loss 2.314 lr 1.9e-04 1,234 tok/s` on stderr; a new line per update when
    stderr is not a terminal (log files, Slurm), rewritten in place when it is.

    The ETA is the mean time per step so far (from the steps' own `step_seconds`, so step 1 already has one, and
    evaluation or checkpoint pauses between updates count too) times the steps left."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.first: tuple[int, float] | None = None  # (step, time) of the first update

    def update(self, step: int, total: int, metrics: dict) -> None:
        now = time.monotonic()
        if self.first is None:
            self.first = (step, now)
        done, elapsed = step - self.first[0], now - self.first[1]
        per_step = elapsed / done if done else metrics.get("step_seconds", math.nan)
        eta = per_step * (total - step)
        parts = [f"step {step}/{total} [{100 * step // max(total, 1)}%]", f"eta {_format_duration(eta)}"]
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "lr" in metrics:
            parts.append(f"lr {metrics['lr']:.2e}")
        if "tokens_per_second" in metrics:
            parts.append(f"{metrics['tokens_per_second']:,.0f} tok/s")
        line = "  ".join(parts)
        self.stream.write(("\r" + line.ljust(100)) if self.tty else line + "\n")
        if self.tty and step >= total:
            self.stream.write("\n")
        self.stream.flush()


class JsonlWriter:
    """metrics.jsonl: one object per logged step or evaluation, appended and flushed (safe to tail)."""

    def __init__(self, path: str):
        self.fh = open(path, "a", buffering=1)

    def write(self, record: dict) -> None:
        # Wall-clock time (Unix seconds) of each record: lines up a run's steps with cluster logs and other runs.
        self.fh.write(json.dumps({**record, "time": round(time.time(), 3)}, sort_keys=False) + "\n")

    def close(self) -> None:
        self.fh.close()


class RunLogger:
    def __init__(self, cfg: LoggerConfig, run_dir: str, run_name: str, config_dict: dict):
        self.cfg = cfg
        self.progress_line = ProgressLine() if cfg.progress else None
        self.jsonl = JsonlWriter(os.path.join(run_dir, "metrics.jsonl"))
        self.wandb_run = _start_wandb(cfg, run_dir, run_name, config_dict)
        self.tensorboard = _start_tensorboard(run_dir, config_dict) if cfg.tensorboard else None
        self.samples_path = os.path.join(run_dir, "samples.jsonl")

    def log_train(self, step: int, metrics: dict) -> None:
        self.jsonl.write({"step": step, **metrics})
        if self.wandb_run is not None:
            self.wandb_run.log({f"train/{k}": v for k, v in metrics.items()}, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"train/{key}", value, step)

    def log_eval(self, step: int, metrics: dict) -> None:
        self.jsonl.write({"step": step, **{f"eval_{k}": v for k, v in metrics.items()}})
        shown = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())
        self.info(f"eval @ step {step}: {shown}")
        if self.wandb_run is not None:
            self.wandb_run.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
        if self.tensorboard is not None:
            for key, value in metrics.items():
                self.tensorboard.add_scalar(f"eval/{key}", value, step)

    def log_samples(self, step: int, examples: list[dict]) -> None:
        """Generated answers beside their prompts and references: samples.jsonl, a TensorBoard text table per eval
        step, and a W&B table (eval/samples)."""
        if not examples:
            return
        with open(self.samples_path, "a") as fh:
            for example in examples:
                fh.write(json.dumps({"step": step, **example}) + "\n")
        if self.tensorboard is not None:
            rows = [f"| {_cell(e['prompt'])} | {_cell(e['answer'])} | {_cell(e['reference'])} |" for e in examples]
            self.tensorboard.add_text("samples", "\n".join(["| prompt | answer | reference |", "|---|---|---|",
                                                            *rows]), step)
        if self.wandb_run is not None:
            import wandb

            table = wandb.Table(columns=["step", "prompt", "answer", "reference"],
                                data=[[step, e["prompt"], e["answer"], e["reference"]] for e in examples])
            self.wandb_run.log({"eval/samples": table}, step=step)

    def log_final_model(self, final_dir: str, kind: str) -> None:
        """final/ as a W&B model artifact; offline runs keep it under RUN/wandb/ until `wandb sync`. An adapter (MBs)
        is uploaded with its tokenizer; a full model (up to hundreds of GB) is recorded by reference -- its files'
        path and checksums, no upload -- so a run's end never waits on, or pays for, copying the weights."""
        if self.wandb_run is None:
            return
        import wandb

        artifact = wandb.Artifact(f"{_artifact_name(self.wandb_run.name or 'run')}-{kind}", type="model",
                                  metadata={"kind": kind, "path": os.path.abspath(final_dir)})
        if kind == "adapter":
            artifact.add_dir(final_dir)
        else:
            artifact.add_reference(f"file://{os.path.abspath(final_dir)}")
        self.wandb_run.log_artifact(artifact, aliases=["latest", "final"])

    def progress(self, step: int, total: int, metrics: dict) -> None:
        if self.progress_line is not None:
            self.progress_line.update(step, total, metrics)

    def info(self, message: str) -> None:
        sys.stderr.write(f"[trainer] {message}\n")
        sys.stderr.flush()

    def close(self) -> None:
        self.jsonl.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _start_wandb(cfg: LoggerConfig, run_dir: str, run_name: str, config_dict: dict) -> Any:
    """A W&B run whose id is kept in the run dir, so a resumed or requeued run continues the same W&B run."""
    if cfg.wandb.mode == "disabled":
        return None
    import wandb

    from trainer.config.frozen import redact_argv

    id_path = os.path.join(run_dir, WANDB_ID_FILE)
    run_id = open(id_path).read().strip() if os.path.exists(id_path) else _new_wandb_id()
    with open(id_path, "w") as fh:
        fh.write(run_id)
    # The key is read by wandb from WANDB_API_KEY itself; it is never passed through our config or logs. W&B records
    # the command line (sys.argv, read whenever it serialises its settings), so a secret given as an override is
    # redacted there for the rest of this process: Hydra has parsed the command line by now.
    sys.argv[:] = redact_argv(sys.argv)
    return wandb.init(project=cfg.wandb.project, entity=cfg.wandb.entity, group=cfg.wandb.group,
                      tags=list(cfg.wandb.tags), name=run_name, id=run_id, resume="allow", mode=cfg.wandb.mode,
                      dir=run_dir, config=config_dict)


def _new_wandb_id() -> str:
    """Eight lowercase letters and digits, like W&B's own ids (wandb 0.31 no longer has wandb.util.generate_id)."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _start_tensorboard(run_dir: str, config_dict: dict) -> Any:
    """A writer under RUN/tensorboard, with the run's config (as frozen, secrets redacted) in its Text tab and its
    hyperparameters in the HParams tab, so runs compared in TensorBoard say how they differ."""
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
    writer.add_text("config", "```\n" + json.dumps(config_dict, indent=2, default=str) + "\n```", 0)
    scalars = {key: value for key, value in _flatten(config_dict).items()
               if isinstance(value, (int, float, str, bool)) and not isinstance(value, dict)}
    writer.add_hparams(scalars, {}, run_name=".")
    return writer


def _cell(text: str) -> str:
    """TEXT as one Markdown table cell."""
    return str(text).replace("|", "\\|").replace("\n", " ")


def _artifact_name(name: str) -> str:
    """W&B artifact names allow letters, digits, dashes, underscores and dots."""
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-") or "run"


def _flatten(node: dict, prefix: str = "") -> dict:
    flat: dict = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def build_logger(cfg: LoggerConfig, run_dir: str, run_name: str, config_dict: dict, is_main: bool):
    return RunLogger(cfg, run_dir, run_name, config_dict) if is_main else NullLogger()
