"""Typed schemas for every config group and section.

Each dataclass checks its own values in `__post_init__` (OmegaConf runs it in `to_object`), raising
`ConfigError` with the field's name; `validate.py` prefixes the section and adds cross-group checks.
Field comments are the documentation users see in `trainer train --cfg job` and in the README.
Polymorphic groups (`peft`, `strategy`, `launcher`) have one schema per option, each with a `name`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from trainer.errors import ConfigError

PRECISIONS = ("fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
DATA_FORMATS = ("alpaca", "text", "chat", "sharegpt", "completion", "preference")
RESUME_MODES = ("auto", "never")
WANDB_MODES = ("disabled", "offline", "online")
MODEL_INITS = ("pretrained", "random")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def _one_of(value: str, allowed: tuple[str, ...], key: str) -> None:
    _require(value in allowed, key, f"{value!r} is not one of {', '.join(allowed)}")


def _non_negative(value: float, key: str, what: str = "a count") -> None:
    _require(value >= 0, key, f"must be >= 0 ({what}; 0 disables), got {value}")


@dataclass
class RunConfig:
    name: str = "run"  # a label for the run; part of the default run dir and the W&B run name
    dir: str = "${paths.runs_dir}/${run.name}-${now:%Y%m%d-%H%M%S}"  # where config, metrics, checkpoints go

    def __post_init__(self) -> None:
        _require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        _require(bool(self.dir), "dir", "must be a directory path")


@dataclass
class PathsConfig:
    runs_dir: str = "runs"  # parent of default run dirs
    cache_dir: str = "${oc.env:TRAINER_CACHE_DIR,${oc.env:HOME,/tmp}/.cache/trainer}"  # tokenised-data cache


@dataclass
class ModelConfig:
    name: str = "model"  # a short label (used in run names)
    path: Optional[str] = None  # local dir with config.json + weights (or a hub id where a hub is reachable)
    tokenizer: Optional[str] = None  # defaults to model.path
    init: str = "pretrained"  # pretrained: load weights; random: fresh weights from the architecture (pre-training)
    arch: Optional[Dict[str, Any]] = None  # config.json fields; used by `trainer plan` and by init=random without a path
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (GPU)
    trust_remote_code: bool = False  # run code shipped with the checkpoint; off unless you trust its source

    def __post_init__(self) -> None:
        _one_of(self.init, MODEL_INITS, "init")
        _one_of(self.attn_implementation, ATTN_IMPLEMENTATIONS, "attn_implementation")
        _require(self.path is not None or (self.init == "random" and self.arch is not None), "path",
                 "is required (a local model dir), unless model.init=random with model.arch given")


@dataclass
class DataConfig:
    path: Optional[str] = None  # training data file (JSON array, JSONL, or text)
    format: str = "alpaca"  # alpaca | text (more formats: see docs)
    val_path: Optional[str] = None  # explicit validation file; otherwise val_ratio of the training data
    val_ratio: float = 0.05  # share of training records held out for evaluation when val_path is not given
    max_seq_len: int = 512  # tokens per row; longer samples are truncated (see truncation)
    truncation: str = "truncate"  # truncate | drop samples longer than max_seq_len
    packing: bool = False  # pack several samples per row (attention kept within each sample)
    train_on_inputs: bool = False  # also train on prompt tokens (default: loss on outputs only)
    template: str = "alpaca"  # prompt template for instruction data
    shuffle: bool = True  # reshuffle every epoch (seeded)
    max_samples: int = 0  # use at most this many training records (0: all)

    def __post_init__(self) -> None:
        _require(self.path is not None and self.path != "", "path", "is required: a JSON/JSONL/text data file")
        _one_of(self.format, DATA_FORMATS, "format")
        _one_of(self.truncation, ("truncate", "drop"), "truncation")
        _require(0.0 <= self.val_ratio < 1.0, "val_ratio", f"must be in [0, 1), got {self.val_ratio}")
        _require(self.max_seq_len >= 8, "max_seq_len", f"must be >= 8 tokens, got {self.max_seq_len}")
        _non_negative(self.max_samples, "max_samples")


@dataclass
class NoPeftConfig:
    """Full fine-tuning: every parameter trains."""

    name: str = "none"


@dataclass
class LoraConfig:
    name: str = "lora"
    r: int = 16  # rank of the update matrices
    alpha: float = 32.0  # scaling numerator: the update is scaled by alpha / r
    dropout: float = 0.05  # dropout on the adapter's input
    target_modules: Any = "all-linear"  # a list of module names (q_proj, v_proj, ...) or "all-linear"
    bias: str = "none"  # none | lora_only | all

    def __post_init__(self) -> None:
        _require(self.r >= 1, "r", f"must be >= 1, got {self.r}")
        _require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        _require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        _one_of(self.bias, ("none", "lora_only", "all"), "bias")
        targets = self.target_modules
        if isinstance(targets, str):
            _require(targets == "all-linear", "target_modules", f"{targets!r}: use a list of module names or all-linear")
        else:
            _require(isinstance(targets, (list, tuple)) and len(targets) > 0 and all(isinstance(t, str) for t in targets),
                     "target_modules", "must be a non-empty list of module names or all-linear")


@dataclass
class SingleStrategyConfig:
    """One process on one device (CUDA if present, else CPU)."""

    name: str = "single"
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        _one_of(self.device, ("auto", "cpu", "cuda"), "device")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw
    lr: float = 2e-4  # peak learning rate
    weight_decay: float = 0.0  # decoupled weight decay; never applied to norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant (all after warmup)
    warmup_ratio: float = 0.03  # share of total steps spent warming up linearly from 0
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 disables)

    def __post_init__(self) -> None:
        _one_of(self.name, ("adamw",), "name")
        _require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        _require(self.weight_decay >= 0, "weight_decay", f"must be >= 0, got {self.weight_decay}")
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        _one_of(self.scheduler, SCHEDULERS, "scheduler")
        _require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        _require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _non_negative(self.max_grad_norm, "max_grad_norm", "a norm")


@dataclass
class TrainConfig:
    max_steps: int = 0  # optimizer steps to run; 0: derive from epochs
    epochs: float = 1.0  # passes over the training data when max_steps is 0
    micro_batch_size: int = 8  # rows per forward/backward on each rank
    global_batch_size: int = 32  # rows per optimizer step over all ranks; accumulation is derived from it
    precision: str = "fp32"  # fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    deterministic: bool = False  # deterministic kernels (slower; bit-exact reruns)

    def __post_init__(self) -> None:
        _non_negative(self.max_steps, "max_steps", "optimizer steps")
        _require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        _require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        _require(self.global_batch_size >= 1, "global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        _one_of(self.precision, PRECISIONS, "precision")


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # evaluate on the validation split every N steps (0 disables; always before/after)
    max_batches: int = 0  # cap on validation batches per evaluation (0: all)
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0 disables)
    early_stopping_min_delta: float = 0.0  # an improvement must lower eval loss by more than this
    generate_samples: int = 0  # greedy-generate answers for this many validation prompts and score them (0 disables)
    max_new_tokens: int = 32  # generation length for the generation metrics

    def __post_init__(self) -> None:
        _non_negative(self.every_n_steps, "every_n_steps", "steps")
        _non_negative(self.max_batches, "max_batches")
        _non_negative(self.early_stopping_patience, "early_stopping_patience", "evaluations")
        _non_negative(self.early_stopping_min_delta, "early_stopping_min_delta", "a loss difference")
        _non_negative(self.generate_samples, "generate_samples")
        _require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # save a checkpoint every N steps (0 disables)
    keep_last: int = 2  # committed checkpoints to keep (0 keeps all)

    def __post_init__(self) -> None:
        _non_negative(self.every_n_steps, "every_n_steps", "steps")
        _non_negative(self.keep_last, "keep_last", "checkpoints; 0 keeps all")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online (online needs WANDB_API_KEY in the environment)
    project: str = "trainer"
    entity: Optional[str] = None
    group: Optional[str] = None  # runs of one sweep share a group
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        _one_of(self.mode, WANDB_MODES, "mode")


@dataclass
class LoggerConfig:
    every_n_steps: int = 1  # log train metrics every N steps (0 disables step logging)
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = False  # also write TensorBoard event files under <run_dir>/tensorboard
    plot: bool = True  # draw <run_dir>/loss_curve.png at the end
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        _non_negative(self.every_n_steps, "every_n_steps", "steps")


@dataclass
class LocalLauncherConfig:
    """Run on this machine: one process, or torchrun workers when nproc_per_node > 1."""

    name: str = "local"
    nproc_per_node: int = 1

    def __post_init__(self) -> None:
        _require(self.nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")


@dataclass
class Config:
    """The root: every run is described by one of these, frozen into <run_dir>/config.yaml."""

    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 1234  # seeds python, numpy and torch; same seed -> same losses
    resume: str = "auto"  # auto: newest committed checkpoint in run.dir | never | a checkpoint path
    model: ModelConfig = MISSING
    data: DataConfig = MISSING
    peft: Any = MISSING
    strategy: Any = MISSING
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)


# The options of the polymorphic groups, by group and option name (registered in Hydra's ConfigStore).
GROUP_OPTIONS: dict[str, dict[str, type]] = {
    "peft": {"none": NoPeftConfig, "lora": LoraConfig},
    "strategy": {"single": SingleStrategyConfig},
    "launcher": {"local": LocalLauncherConfig},
}
