"""Typed schemas for every config group and section.

Each dataclass checks its own values in `__post_init__` (OmegaConf runs it in `to_object`), raising
`ConfigError` with the field's name; `validate.py` prefixes the section and adds cross-group checks.
Field comments are the documentation users see in `trainer train --cfg job` and in the README.
Polymorphic groups (`peft`, `strategy`, `launcher`) have one schema per option, each with a `name`; the PEFT
options live in peft_schema.py and the Slurm launcher in slurm_schema.py, and are registered here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from trainer.config.checks import at_most, non_negative, one_of, require
from trainer.config.peft_schema import (  # the `peft` group's options
    DoraConfig,
    IA3Config,
    LoraConfig,
    NoPeftConfig,
    PrefixTuningConfig,
    PromptTuningConfig,
    QLoraConfig,
)
from trainer.config.slurm_schema import SlurmLauncherConfig  # the `slurm` launcher option
from trainer.errors import ConfigError
from trainer.kernels import KERNELS
from trainer.objectives import DEFAULT_CHUNK_TOKENS, FUSED_KERNELS, OBJECTIVES
from trainer.text_metrics import GENERATION_METRICS

# Upper bounds that only a slipped digit reaches: refused before anything is allocated rather than a run that plans
# an LR schedule over 10^11 steps or a model asked for a context no model has.
MAX_STEPS_LIMIT = 10**9
MAX_EPOCHS_LIMIT = 10**6
MAX_SEQ_LEN_LIMIT = 2**24

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULERS = ("cosine", "linear", "constant")
DATA_FORMATS = ("alpaca", "text", "chat", "sharegpt", "completion", "preference", "auto")
DATA_TEMPLATES = ("auto", "tokenizer", "chatml", "llama-3", "alpaca")
DEDUP_MODES = ("none", "exact", "normalized")
TEXT_UNITS = ("block", "file", "line")
# The record fields each data format reads, and the key each one has in a record unless data.columns says otherwise.
FORMAT_COLUMNS: Dict[str, Dict[str, str]] = {
    "alpaca": {"instruction": "instruction", "input": "input", "output": "output", "system": "system"},
    "chat": {"messages": "messages", "role": "role", "content": "content"},
    "sharegpt": {"messages": "conversations", "role": "from", "content": "value", "system": "system"},
    "text": {"text": "text"},
    "completion": {"prompt": "prompt", "completion": "completion"},
    "preference": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "role": "role",
                   "content": "content"},
}
RESUME_MODES = ("auto", "never")
WANDB_MODES = ("disabled", "offline", "online")
MODEL_INITS = ("pretrained", "random")
ATTN_IMPLEMENTATIONS = ("auto", "sdpa", "eager", "flash_attention_2")


@dataclass
class RunConfig:
    name: str = "${run_label:}"  # a label for the run (default: model-data-method); part of the run dir and W&B name
    dir: str = "${paths.runs_dir}/${run.name}-${now:%Y%m%d-%H%M%S}"  # where config, metrics, checkpoints go
    objective: str = "eval_after.loss"  # summary.json metric that sweeps rank by and Optuna optimises
    # Optimizer settings a resume may change (a resume restores them from the checkpoint otherwise, and refuses a
    # different value), e.g. [optim.lr]; see trainer/run_identity.py and docs/checkpoints.md
    allow_changes: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        from trainer.run_identity import OPT_IN_KEYS

        require(bool(self.name) and "/" not in self.name, "name", "must be a non-empty name without '/'")
        require(bool(self.dir), "dir", "must be a directory path")
        for i, key in enumerate(self.allow_changes):
            one_of(key, OPT_IN_KEYS, f"allow_changes.{i}")


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
    # Empty rather than None so that `model.arch={...}` on the command line merges into it (OmegaConf cannot merge
    # a dict into a None node).
    # config.json fields; used by `trainer plan`, and by init=random without a path
    arch: Dict[str, Any] = field(default_factory=dict)
    # auto (sdpa; eager for Gemma 2, whose logit soft-capping sdpa cannot apply) | sdpa | eager | flash_attention_2
    attn_implementation: str = "auto"
    trust_remote_code: bool = False  # run code shipped with the checkpoint; off unless you trust its source
    kernels: str = "none"  # none | liger: Liger's fused RMSNorm, RoPE and SwiGLU kernels (CUDA; trainer/kernels.py)

    def __post_init__(self) -> None:
        one_of(self.init, MODEL_INITS, "init")
        one_of(self.attn_implementation, ATTN_IMPLEMENTATIONS, "attn_implementation")
        one_of(self.kernels, KERNELS, "kernels")
        require(self.path is not None or (self.init == "random" and bool(self.arch)), "path",
                 "is required (a local model dir), unless model.init=random with model.arch given")


@dataclass
class ColumnsConfig:
    """Record keys to read instead of a format's own field names, e.g. Dolly: input=context output=response."""

    instruction: Optional[str] = None  # alpaca
    input: Optional[str] = None  # alpaca
    output: Optional[str] = None  # alpaca
    system: Optional[str] = None  # alpaca, sharegpt: an optional system prompt field
    messages: Optional[str] = None  # chat (messages), sharegpt (conversations): the list of turns
    role: Optional[str] = None  # chat/preference (role), sharegpt (from): a turn's speaker
    content: Optional[str] = None  # chat/preference (content), sharegpt (value): a turn's text
    text: Optional[str] = None  # text
    prompt: Optional[str] = None  # completion, preference
    completion: Optional[str] = None  # completion
    chosen: Optional[str] = None  # preference
    rejected: Optional[str] = None  # preference


@dataclass
class DataSourceConfig:
    """One entry of data.sources; unset options fall back to the top level of data."""

    path: str = MISSING  # a file, glob, directory, dataset saved with datasets' save_to_disk, or a hub dataset id
    format: Optional[str] = None  # defaults to data.format
    weight: float = 1.0  # uses of each record per epoch: 2 repeats it, 0.5 takes a seeded half
    max_samples: int = 0  # read at most the first N records (0: data.max_samples)
    split: Optional[str] = None  # split of a hub dataset or saved DatasetDict (default: train)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # overrides data.columns for this source


@dataclass
class ReplayConfig:
    """General data mixed into every epoch so the fine-tune keeps what the model knew (a guard against forgetting)."""

    path: Optional[str] = None  # a file, glob, directory or dataset in any data format; null: no replay
    format: str = "text"  # its format (as data.format)
    # share of each epoch's training samples drawn from it (its records repeat if there are few); 0.2 from the demo's
    # sweep (docs/forgetting.md)
    ratio: float = 0.2


@dataclass
class DataConfig:
    path: Optional[str] = None  # training data: a file (JSON, JSONL, CSV, Parquet, text), glob, directory or dataset
    sources: List[DataSourceConfig] = field(default_factory=list)  # several sources mixed by weight (instead of path)
    format: str = "auto"  # auto (from the fields) | alpaca | chat | sharegpt | text | completion | preference
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # record keys, e.g. input=context output=response
    template: str = "auto"  # auto (tokenizer's own, else alpaca/chatml) | tokenizer | chatml | llama-3 | alpaca
    val_path: Optional[str] = None  # explicit validation file; otherwise val_ratio of the training data
    val_ratio: float = 0.05  # share of training records held out for evaluation when val_path is not given
    test_path: Optional[str] = None  # explicit test file; otherwise test_ratio of the training data
    test_ratio: float = 0.0  # share of training records held out as a test split (reported by `trainer data check`)
    # tokens per row; longer samples are truncated (see truncation). null: the model's context length, at most 2048
    max_seq_len: Optional[int] = None
    truncation: str = "truncate"  # truncate | drop samples longer than max_seq_len
    packing: bool = False  # pack several samples per row (attention kept within each sample)
    train_on_inputs: bool = False  # also train on prompt tokens (default: loss on outputs only)
    shuffle: bool = True  # reshuffle every epoch (seeded)
    max_samples: int = 0  # use at most the first N records of each source (0: all)
    dedup: str = "none"  # none | exact | normalized (case, punctuation, spacing ignored); duplicates are always counted
    strict: bool = False  # error on records that would be skipped (blank answer, conversation ending on a user turn)
    text_unit: str = "block"  # plain-text files: one document per blank-line-separated block | file | line
    # text data: split documents longer than max_seq_len into windows of max_seq_len tokens (false: truncate them)
    text_chunking: bool = True
    cache: bool = True  # cache tokenised data under paths.cache_dir, keyed by a fingerprint of everything it depends on
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # general data replayed at a ratio (see ReplayConfig)

    def __post_init__(self) -> None:
        has_path = self.path is not None and self.path != ""
        require(has_path or bool(self.sources), "path",
                 "is required: a data file, glob, directory or dataset (or give data.sources)")
        require(not (has_path and self.sources), "sources", "give data.path or data.sources, not both "
                 "(set data.path=null to use sources)")
        one_of(self.format, DATA_FORMATS, "format")
        one_of(self.template, DATA_TEMPLATES, "template")
        one_of(self.truncation, ("truncate", "drop"), "truncation")
        one_of(self.dedup, DEDUP_MODES, "dedup")
        one_of(self.text_unit, TEXT_UNITS, "text_unit")
        require(0.0 <= self.val_ratio < 1.0, "val_ratio", f"must be in [0, 1), got {self.val_ratio}")
        require(0.0 <= self.test_ratio < 1.0, "test_ratio", f"must be in [0, 1), got {self.test_ratio}")
        require(self.val_ratio + self.test_ratio < 1.0, "test_ratio", "val_ratio + test_ratio must leave records "
                 "to train on (sum < 1)")
        require(self.max_seq_len is None or self.max_seq_len >= 8, "max_seq_len",
                 f"must be >= 8 tokens (or null: the model's context length, at most 2048), got {self.max_seq_len}")
        if self.max_seq_len is not None:
            at_most(self.max_seq_len, MAX_SEQ_LEN_LIMIT, "max_seq_len", "tokens: longer than any model's context")
        non_negative(self.max_samples, "max_samples")
        formats = {self.format}
        for i, source in enumerate(self.sources):
            key = f"sources.{i}"
            require(bool(source.path), f"{key}.path", "is required")
            if source.format is not None:
                one_of(source.format, DATA_FORMATS, f"{key}.format")
            require(source.weight > 0, f"{key}.weight", f"must be > 0 (uses of each record per epoch), got "
                     f"{source.weight}")
            non_negative(source.max_samples, f"{key}.max_samples")
            _check_columns(source.columns, {source.format or self.format}, f"{key}.columns")
            formats.add(source.format or self.format)
        _check_columns(self.columns, formats, "columns")
        one_of(self.replay.format, DATA_FORMATS, "replay.format")
        require(0.0 < self.replay.ratio < 1.0, "replay.ratio", f"must be in (0, 1): the share of each epoch's "
                f"samples that are replayed, got {self.replay.ratio}")


def _check_columns(columns: Any, formats: set, key: str) -> None:
    """A mapped field must be one that a format in use reads (auto may turn out to be any of them)."""
    if columns is None:
        return
    known = set().union(*(FORMAT_COLUMNS[f] for f in FORMAT_COLUMNS)) if "auto" in formats else set().union(
        *(FORMAT_COLUMNS[f] for f in formats if f in FORMAT_COLUMNS))
    for name, value in vars(columns).items():
        if value is None:
            continue
        require(name in known, f"{key}.{name}", f"is not a field of format {', '.join(sorted(formats))} (its fields: "
                 f"{', '.join(sorted(known))})")
        require(isinstance(value, str) and value != "", f"{key}.{name}", "must be a record key (a non-empty string)")


@dataclass
class SingleStrategyConfig:
    """One process on one device (CUDA if present, else CPU)."""

    name: str = "single"
    device: str = "auto"  # auto | cpu | cuda

    def __post_init__(self) -> None:
        one_of(self.device, ("auto", "cpu", "cuda"), "device")


@dataclass
class DDPStrategyConfig:
    """DistributedDataParallel: a full replica per rank; gradients all-reduced once per step."""

    name: str = "ddp"
    timeout_s: int = 1800  # process-group timeout: a rank silent this long ends the job
    bucket_cap_mb: int = 25
    find_unused_parameters: bool = False

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


@dataclass
class FSDPStrategyConfig:
    """FSDP2: parameters, gradients and optimizer state sharded; one shard group per decoder layer."""

    name: str = "fsdp"
    timeout_s: int = 1800
    reshard_after_forward: bool = True  # free gathered layers after forward (less memory, one more all-gather)
    cpu_offload: bool = False  # keep shards and optimizer state in host memory

    def __post_init__(self) -> None:
        require(self.timeout_s > 0, "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")


@dataclass
class DeepSpeedStrategyConfig:
    """DeepSpeed ZeRO. The JSON is generated from this config; add keys with deepspeed_overrides."""

    name: str = "zero2"
    stage: int = 2  # 1: optimizer states sharded; 2: + gradients; 3: + parameters
    timeout_s: int = 1800
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu | nvme (stage 3 only)
    nvme_path: Optional[str] = None  # a fast local disk for nvme offload
    overlap_comm: bool = False
    deepspeed_overrides: Dict[str, Any] = field(default_factory=dict)  # extra DeepSpeed JSON keys

    def __post_init__(self) -> None:
        require(self.stage in (1, 2, 3), "stage", f"must be 1, 2 or 3, got {self.stage}")
        require(self.timeout_s > 0, "timeout_s", f"must be > 0 seconds, got {self.timeout_s}")
        one_of(self.offload_optimizer, ("none", "cpu", "nvme"), "offload_optimizer")
        one_of(self.offload_param, ("none", "cpu", "nvme"), "offload_param")
        require(self.offload_param == "none" or self.stage == 3, "offload_param", "needs stage 3 (strategy=zero3)")
        require("nvme" not in (self.offload_optimizer, self.offload_param) or bool(self.nvme_path), "nvme_path",
                 "is required for nvme offload: a directory on a fast local disk")


@dataclass
class AutoStrategyConfig:
    """Resolved by `trainer train` before launch (launch/auto_strategy.py) from the model's size and the GPUs:
    several GPUs -> fsdp (zero3_offload when that does not fit); one device -> single, and when the requested
    method does not fit, LoRA on a bf16 base, then QLoRA. The frozen config holds the concrete choice."""

    name: str = "auto"
    allow_peft_fallback: bool = True  # may replace a PEFT method that does not fit by LoRA, then QLoRA
    use_all_gpus: bool = True  # with launcher.nproc_per_node=1 and several local GPUs, run one process per GPU


OPTIMIZERS = ("adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")


@dataclass
class FreezeConfig:
    """Parameters that do not train, on top of what the PEFT method freezes (layer numbers count from the input)."""

    patterns: List[str] = field(default_factory=list)  # regexes searched in parameter names, e.g. ['embed_tokens']
    first_n_layers: int = 0  # freeze the embeddings and decoder layers 0..N-1 (general features, kept as learnt)
    # Gradual unfreezing (ULMFiT): train the top layer (and head) first, then one more layer every N steps, so lower
    # layers move only once the upper ones have adapted. 0 disables.
    unfreeze_every_n_steps: int = 0

    def __post_init__(self) -> None:
        import re

        # Keys start with freeze.: the error surfaces through the optim section, which adds only "optim.".
        for i, pattern in enumerate(self.patterns):
            try:
                re.compile(pattern)
            except re.error as err:
                raise ConfigError(f"freeze.patterns.{i}", f"{pattern!r} is not a regular expression: {err}") from None
        non_negative(self.first_n_layers, "freeze.first_n_layers", "layers")
        non_negative(self.unfreeze_every_n_steps, "freeze.unfreeze_every_n_steps", "steps")


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw (torch; fused on CUDA) | adamw_8bit | paged_adamw_8bit | paged_adamw_32bit (bnb)
    lr: Optional[float] = None  # peak learning rate; null: the PEFT method's usual one (full 2e-5, LoRA/QLoRA 2e-4)
    weight_decay: float = 0.0  # decoupled weight decay; never applied to norms and biases
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    scheduler: str = "cosine"  # cosine | linear | constant (all after warmup)
    warmup_ratio: float = 0.03  # share of total steps spent warming up linearly from 0
    warmup_steps: int = 0  # warm up over exactly this many steps instead (0: use warmup_ratio)
    min_lr_ratio: float = 0.0  # cosine/linear decay ends at lr * min_lr_ratio
    max_grad_norm: float = 1.0  # clip the global gradient norm (0 disables)
    # Layer-wise LR decay: the head trains at lr, decoder layer i at lr * decay^(L - i), embeddings at lr * decay^(L+1),
    # so layers near the input (general features) move least. 1.0 disables.
    layer_lr_decay: float = 1.0
    freeze: FreezeConfig = field(default_factory=FreezeConfig)

    def __post_init__(self) -> None:
        one_of(self.name, OPTIMIZERS, "name")
        require(self.lr is None or self.lr > 0, "lr",
                 f"must be > 0 (or null: the PEFT method's default), got {self.lr}")
        non_negative(self.weight_decay, "weight_decay", "a decay factor", zero="turns it off")
        require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        one_of(self.scheduler, SCHEDULERS, "scheduler")
        require(0.0 <= self.warmup_ratio < 1.0, "warmup_ratio", f"must be in [0, 1), got {self.warmup_ratio}")
        non_negative(self.warmup_steps, "warmup_steps", "steps")
        require(0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        non_negative(self.max_grad_norm, "max_grad_norm", "a norm")
        require(0.0 < self.layer_lr_decay <= 1.0, "layer_lr_decay", f"must be in (0, 1] (1 disables), got "
                 f"{self.layer_lr_decay}")


@dataclass
class TrainConfig:
    max_steps: int = 0  # optimizer steps to run; 0: derive from epochs
    epochs: float = 3.0  # passes over the training data when max_steps is 0
    # cap every epoch at this many optimizer steps (0: the whole data); the next epoch starts a new shuffle. For
    # big datasets: epoch-based evaluation, checkpoints and schedules on a slice of the data each time
    max_steps_per_epoch: int = 0
    micro_batch_size: int = 2  # rows per forward/backward on each rank (2 x 2048 tokens: an 8B LoRA fits 80 GB)
    global_batch_size: int = 32  # rows per optimizer step over all ranks; accumulation is derived from it
    # auto (bf16 on GPUs that have it, fp32 on CPU) | fp32 | bf16 | fp16 (fp16 uses dynamic loss scaling)
    precision: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    # with gradient checkpointing: each checkpointed layer's input waits in host memory (page-locked) from the forward
    # until backward recomputes the layer, so one layer input stays on the GPU instead of all of them
    activation_offloading: bool = False
    # a frozen input embedding (LoRA family, IA3; untied lm_head; single, ddp, zero1, zero2) stays in host memory: the
    # lookup runs there and only the looked-up rows go to the GPU (1 GiB less for Llama-3.1-8B)
    embedding_on_host: bool = False
    deterministic: bool = False  # deterministic kernels (slower; bit-exact reruns)
    # torch.compile each decoder layer (inductor): faster steps once compiled, after a compile of tens of seconds at
    # the start (and one more when row lengths first vary); single, ddp and fsdp (trainer/strategy/compile.py)
    compile: bool = False
    nonfinite: str = "stop"  # a non-finite loss or grad norm: stop (exit 3, last checkpoint kept) | skip the step

    def __post_init__(self) -> None:
        one_of(self.nonfinite, ("stop", "skip"), "nonfinite")
        non_negative(self.max_steps, "max_steps", "optimizer steps", zero="derives them from epochs")
        non_negative(self.max_steps_per_epoch, "max_steps_per_epoch", "optimizer steps", zero="means no cap")
        at_most(self.max_steps, MAX_STEPS_LIMIT, "max_steps", "optimizer steps: decades at a millisecond each")
        at_most(self.epochs, MAX_EPOCHS_LIMIT, "epochs", "passes over the data")
        require(self.epochs > 0, "epochs", f"must be > 0, got {self.epochs}")
        require(self.micro_batch_size >= 1, "micro_batch_size", f"must be >= 1, got {self.micro_batch_size}")
        require(self.global_batch_size >= 1, "global_batch_size", f"must be >= 1, got {self.global_batch_size}")
        one_of(self.precision, PRECISIONS, "precision")
        require(not self.activation_offloading or self.gradient_checkpointing, "activation_offloading",
                "needs train.gradient_checkpointing=true: what it offloads are the checkpointed layers' inputs")


@dataclass
class ObjectiveConfig:
    """What a step optimises (trainer/objectives/)."""

    name: str = "sft"  # sft: next-token cross-entropy over the label tokens
    # lm_head + cross-entropy over this many tokens at a time, recomputed in backward, so the full b x s x vocab
    # logits never exist (training and evaluation); 0: the unchunked loss
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    fused_kernel: str = "auto"  # auto: Liger's fused linear cross-entropy on CUDA when liger_kernel is installed | none
    # Preference objectives (dpo, ipo, simpo, orpo, kto; docs/preference.md). beta: DPO/IPO/KTO's KL strength (IPO's
    # tau), SimPO's reward scale, ORPO's odds-ratio weight (lambda); null: the method's usual value (0.1; SimPO 2.0).
    beta: Optional[float] = None
    label_smoothing: float = 0.0  # DPO/SimPO: the assumed share of flipped labels (conservative DPO)
    simpo_gamma: float = 1.0  # SimPO's target reward margin
    # ORPO's NLL term: answer (the chosen answer's mean token NLL, as the ORPO paper writes it and SFT masks) |
    # sequence (the mean over the micro batch's chosen prompt and answer tokens, as TRL's ORPOTrainer takes it)
    orpo_nll: str = "answer"
    # KTO: the weights of desirable and undesirable answers' losses; with unbalanced data, keep
    # desirable_weight x #desirable / (undesirable_weight x #undesirable) in [1, 4/3] (the KTO paper's advice)
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self) -> None:
        one_of(self.name, OBJECTIVES, "name")
        non_negative(self.chunk_tokens, "chunk_tokens", "tokens")
        one_of(self.fused_kernel, FUSED_KERNELS, "fused_kernel")
        require(self.beta is None or self.beta > 0, "beta", f"must be > 0, got {self.beta}")
        one_of(self.orpo_nll, ("answer", "sequence"), "orpo_nll")
        require(0 <= self.label_smoothing < 0.5, "label_smoothing", f"must be in [0, 0.5), got {self.label_smoothing}")
        for key in ("desirable_weight", "undesirable_weight"):
            require(getattr(self, key) > 0, key, f"must be > 0, got {getattr(self, key)}")
        # An option of one method set for another would be silently ignored: say so instead.
        for key, default, methods in _METHOD_OPTIONS:
            require(getattr(self, key) == default or self.name in methods, key,
                    f"is an option of objective.name={' or '.join(methods)}, not {self.name}: leave it at "
                    f"{default!r} or choose that objective")


# (key, default, the objectives that read it)
_METHOD_OPTIONS = (("orpo_nll", "answer", ("orpo",)), ("simpo_gamma", 1.0, ("simpo",)),
                   ("label_smoothing", 0.0, ("dpo", "simpo")), ("desirable_weight", 1.0, ("kto",)),
                   ("undesirable_weight", 1.0, ("kto",)))


@dataclass
class EvalConfig:
    every_n_steps: int = 0  # evaluate on the validation split every N steps (0 disables; always before/after)
    every_epoch: bool = False  # also evaluate at the end of each pass over the training data
    max_batches: int = 0  # cap on validation batches per evaluation (0: all)
    early_stopping_patience: int = 0  # stop after this many evaluations without improvement (0 disables)
    early_stopping_min_delta: float = 0.0  # an improvement must lower eval loss by more than this
    generate_samples: int = 0  # greedy-generate answers for this many validation prompts and score them (0 disables)
    max_new_tokens: int = 32  # generation length for the generation metrics
    # what the generated answers are scored with (trainer/text_metrics.py): exact_match, token_f1, bleu (sacrebleu),
    # rouge1, rouge2, rougeL (rouge-score; both in the `eval` extra)
    metrics: List[str] = field(default_factory=lambda: ["exact_match", "token_f1"])
    # Forgetting check (trainer/forgetting.py): data the fine-tune should leave alone, evaluated with every evaluation
    forgetting_path: Optional[str] = None  # a file/glob/dir in any data format; null disables the check
    forgetting_format: str = "text"  # its format (as data.format)
    forgetting_max_samples: int = 256  # use at most this many of its records (0: all)
    max_forgetting: float = 0.0  # stop once its loss rose by more than this fraction since before training (0: off)

    def __post_init__(self) -> None:
        non_negative(self.every_n_steps, "every_n_steps", "steps")
        non_negative(self.max_batches, "max_batches")
        non_negative(self.early_stopping_patience, "early_stopping_patience", "evaluations")
        non_negative(self.early_stopping_min_delta, "early_stopping_min_delta", "a loss difference")
        non_negative(self.generate_samples, "generate_samples")
        require(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        for name in self.metrics:
            one_of(name, GENERATION_METRICS, "metrics")
        one_of(self.forgetting_format, DATA_FORMATS, "forgetting_format")
        non_negative(self.forgetting_max_samples, "forgetting_max_samples")
        non_negative(self.max_forgetting, "max_forgetting", "a fraction of the loss before training")


@dataclass
class RegularizeConfig:
    """Penalties that keep the trainable weights near where training started (trainer/regularize.py): a guard
    against forgetting beside data.replay. Single-process and DDP runs (every trainable weight whole on each rank)."""

    # EWC: ewc_lambda/2 x sum F (w - w0)^2, F the Fisher information of the starting weights on fisher_path's data
    ewc_lambda: float = 0.0  # 0: off
    l2_lambda: float = 0.0  # L2 towards the starting weights: l2_lambda/2 x sum (w - w0)^2 (0: off)
    fisher_path: Optional[str] = None  # general data for the Fisher (any data format); null: data.replay.path
    fisher_format: str = "text"  # its format (as data.format)
    fisher_samples: int = 64  # records the Fisher is averaged over (one forward and backward each, before step 1)

    def __post_init__(self) -> None:
        non_negative(self.ewc_lambda, "ewc_lambda", "a penalty weight", zero="switches EWC off")
        non_negative(self.l2_lambda, "l2_lambda", "a penalty weight", zero="switches the L2 penalty off")
        one_of(self.fisher_format, DATA_FORMATS, "fisher_format")
        require(self.fisher_samples >= 1, "fisher_samples", f"must be >= 1, got {self.fisher_samples}")

    @property
    def active(self) -> bool:
        return self.ewc_lambda > 0 or self.l2_lambda > 0

    @property
    def anchor_copies(self) -> int:
        """fp32 copies of the trainable weights the penalty keeps: the starting weights, and EWC's Fisher."""
        return 2 if self.ewc_lambda > 0 else (1 if self.l2_lambda > 0 else 0)


@dataclass
class RegistryConfig:
    """The model registry (MLflow; trainer/registry.py, docs/registry.md): where `trainer register` records a run's
    result, and whether training registers it by itself when it completes."""

    # an MLflow tracking URI (http://mlflow:5000, sqlite:///...) or a directory for an embedded store; null:
    # MLFLOW_TRACKING_URI, else an embedded SQLite store in <paths.runs_dir>/registry
    tracking_uri: Optional[str] = None
    auto: bool = False  # register final/ as a new version when training completes (rank 0, after summary.json)
    name: Optional[str] = None  # the registered model's name for auto (null: run.name)
    aliases: List[str] = field(default_factory=list)  # aliases for an auto-registered version, e.g. [champion]
    require: List[str] = field(default_factory=list)  # gates for auto, e.g. ["eval.exact_match>=0.6"]

    def __post_init__(self) -> None:
        from trainer.gate import FORM, is_requirement

        for i, text in enumerate(self.require):
            require(is_requirement(text), f"require.{i}", f"{text!r}: {FORM}")
        uri = self.tracking_uri or ""
        require("@" not in uri.partition("://")[2].split("/", 1)[0], "tracking_uri",
                "holds a user name or password, which would be frozen into config.yaml: give the URI without them "
                "and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
        require(self.name is None or (bool(self.name) and not any(c in self.name for c in "@/:")), "name",
                f"{self.name!r}: a registered model name has no '@', '/' or ':'")


@dataclass
class CheckpointConfig:
    every_n_steps: int = 0  # save a checkpoint every N steps (0 disables)
    every_n_minutes: float = 0.0  # also save once this long since the last save (rank 0's clock decides; 0 disables)
    every_epoch: bool = False  # also save at the end of each pass over the training data
    keep_last: int = 2  # committed checkpoints to keep (0 keeps all)
    async_save: bool = False  # write in a background thread (DCP strategies); committed once every rank has finished
    checksum: bool = True  # record a crc32 of every file in COMMITTED and check it at resume (sizes are always checked)

    def __post_init__(self) -> None:
        non_negative(self.every_n_steps, "every_n_steps", "steps")
        non_negative(self.every_n_minutes, "every_n_minutes", "minutes")
        non_negative(self.keep_last, "keep_last", "committed checkpoints to keep", zero="keeps all")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online (online needs WANDB_API_KEY in the environment)
    project: str = "trainer"
    entity: Optional[str] = None
    group: Optional[str] = None  # runs of one sweep share a group
    tags: List[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        one_of(self.mode, WANDB_MODES, "mode")


@dataclass
class LoggerConfig:
    every_n_steps: int = 1  # log train metrics every N steps (0 disables step logging)
    progress: bool = True  # progress bar on stderr
    tensorboard: bool = False  # also write TensorBoard event files under <run_dir>/tensorboard
    plot: bool = True  # draw <run_dir>/loss_curve.png at the end
    # profile this many optimizer steps with torch.profiler, from step 2 (step 1 warms up): a Chrome/Perfetto trace
    # and a table of the costliest operators per rank under <run_dir>/profile/ (0: off)
    profile_steps: int = 0
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def __post_init__(self) -> None:
        non_negative(self.every_n_steps, "every_n_steps", "steps")
        non_negative(self.profile_steps, "profile_steps", "steps", zero="turns profiling off")


@dataclass
class LocalLauncherConfig:
    """Run here: one process, or torchrun (or deepspeed) workers when nproc_per_node x nnodes > 1."""

    name: str = "local"
    backend: str = "torchrun"  # torchrun | deepspeed (the deepspeed launcher)
    nproc_per_node: int = 1  # worker processes on this node (one per GPU; on CPU, processes)
    nnodes: int = 1  # nodes in the job; run the same command on each with its node_rank
    node_rank: int = 0
    rdzv_endpoint: str = "127.0.0.1:29500"  # host:port of the c10d rendezvous (the first node)
    rdzv_id: str = "trainer"  # a job id shared by all nodes of one job
    hostfile: Optional[str] = None  # DeepSpeed hostfile for multi-node deepspeed launches
    max_restarts: int = 0  # torchrun restarts all workers this many times after a failure

    def __post_init__(self) -> None:
        one_of(self.backend, ("torchrun", "deepspeed"), "backend")
        require(self.nproc_per_node >= 1, "nproc_per_node", f"must be >= 1, got {self.nproc_per_node}")
        require(self.nnodes >= 1, "nnodes", f"must be >= 1, got {self.nnodes}")
        require(0 <= self.node_rank < self.nnodes, "node_rank", f"must be in [0, nnodes), got {self.node_rank}")
        require(":" in self.rdzv_endpoint, "rdzv_endpoint", f"must be host:port, got {self.rdzv_endpoint!r}")
        non_negative(self.max_restarts, "max_restarts", "restarts")

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


@dataclass
class HardwareConfig:
    """The machines a run is planned for (`trainer plan`); training itself reads none of this."""

    gpu_memory_gb: Optional[float] = None  # GiB per GPU (H100 80GB: 80); unset: the local GPUs' (nvidia-smi), else 80
    host_memory_gb: Optional[float] = None  # GiB of host memory per node for offloaded state; unset: not checked

    def __post_init__(self) -> None:
        for key in ("gpu_memory_gb", "host_memory_gb"):
            value = getattr(self, key)
            require(value is None or value > 0, key, f"must be > 0 GiB (or null), got {value}")


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
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    regularize: RegularizeConfig = field(default_factory=RegularizeConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    launcher: Any = MISSING
    paths: PathsConfig = field(default_factory=PathsConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)


# The options of the polymorphic groups, by group and option name (registered in Hydra's ConfigStore).
GROUP_OPTIONS: dict[str, dict[str, type]] = {
    "peft": {"none": NoPeftConfig, "lora": LoraConfig, "dora": DoraConfig, "qlora": QLoraConfig, "ia3": IA3Config,
             "prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig},
    "strategy": {"single": SingleStrategyConfig, "ddp": DDPStrategyConfig, "fsdp": FSDPStrategyConfig,
                 "deepspeed": DeepSpeedStrategyConfig, "auto": AutoStrategyConfig},
    "launcher": {"local": LocalLauncherConfig, "slurm": SlurmLauncherConfig},
}


def schema_for_option(group: str, name: str) -> type:
    """The schema of a polymorphic group's option, by its `name` (zero1..zero3_offload share one schema)."""
    if group == "strategy" and name.startswith("zero"):
        return DeepSpeedStrategyConfig
    return GROUP_OPTIONS[group][name]
