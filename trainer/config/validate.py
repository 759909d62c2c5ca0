"""Turn a composed DictConfig into a validated `Config`, or raise one `ConfigError` naming the key.

Runs before anything heavy is imported: schema checks per section (each dataclass's __post_init__),
then checks that need several groups or the file system.
"""

from __future__ import annotations

import os
from typing import Any

from trainer.config.feasibility import experts_refusal, host_embedding_refusal, refusal
from trainer.config.schema import Config
from trainer.errors import ConfigError
from trainer.remote_code import shipped_code

SECTIONS = ("run", "model", "data", "peft", "strategy", "optim", "train", "objective", "eval", "regularize",
            "checkpoint", "registry", "logger", "launcher", "paths", "hardware")


def _omegaconf_error_to_config_error(err: Exception, section: str) -> ConfigError:
    """OmegaConf's validation errors carry the full key; keep their first line, drop the object dump."""
    key = getattr(err, "full_key", None) or section
    if section and not str(key).startswith(section):
        key = f"{section}.{key}"
    message = str(getattr(err, "msg", None) or err).splitlines()[0]
    return ConfigError(str(key), message)


def to_config(cfg: Any, notes: list[str] | None = None) -> Config:
    """Validate every section of the composed config, fill the defaults that depend on the model, method and
    hardware (trainer/config/defaults.py; each decision is appended to NOTES), and return the typed root."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config.defaults import apply_defaults

    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _omegaconf_error_to_config_error(err, "") from None
    sections = validate_sections(cfg, SECTIONS)
    decided = apply_defaults(sections)
    if notes is not None:
        notes.extend(decided)
    config = Config(seed=cfg.seed, resume=cfg.resume, **sections)
    check_cross_group(config)
    from trainer.data.pipeline import decide_formats

    decided = decide_formats(config.data)  # after the checks above: the data files exist
    if notes is not None:
        notes.extend(decided)
    return config


def validate_sections(cfg: Any, sections: tuple[str, ...]) -> dict[str, Any]:
    """Each named section of a composed config as its typed dataclass, its errors prefixed by the section."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from trainer.config.checks import finite_floats

    typed: dict[str, Any] = {}
    for section in sections:
        try:
            typed[section] = OmegaConf.to_object(cfg[section])
            _refuse_unknown_keys(cfg[section], typed[section], "", section)
            finite_floats(typed[section], "")
        except ConfigError as err:
            raise err.under(section) from None
        except OmegaConfBaseException as err:
            cause = err.__cause__ if isinstance(err.__cause__, ConfigError) else None
            if cause is not None:
                raise cause.under(section) from None
            raise _omegaconf_error_to_config_error(err, section) from None
    return typed


def _refuse_unknown_keys(node: Any, typed: Any, key: str, section: str) -> None:
    """Keys that Hydra's '+' added where the schema has no field (`+train.max_stepz=3`): OmegaConf drops them when it
    builds the dataclass, so the run would silently ignore them. Free-form sections (plain dicts) take any key."""
    import dataclasses

    from omegaconf import DictConfig

    from trainer.config.frozen import is_secret_key
    from trainer.config.suggest import unknown_key_message

    if not dataclasses.is_dataclass(typed) or not isinstance(node, DictConfig):
        return
    fields = {f.name for f in dataclasses.fields(typed)}
    for name in node.keys():
        dotted = f"{key}.{name}" if key else str(name)  # under the section: the caller adds it
        if name not in fields and is_secret_key(str(name)):
            raise ConfigError(dotted, "credentials are not config keys (the command line is recorded in shell history, "
                              "process lists and W&B): set them in the environment, e.g. WANDB_API_KEY or HF_TOKEN")
        if name not in fields:
            raise ConfigError(dotted, unknown_key_message(f"{section}.{dotted}"))
        _refuse_unknown_keys(node[name], getattr(typed, name), dotted, section)


COMPILE_STRATEGIES = ("single", "ddp", "fsdp")


def check_cross_group(config: Config) -> None:
    """Checks that involve more than one field, or the file system."""
    if config.resume not in ("auto", "never") and not os.path.exists(config.resume):
        raise ConfigError("resume", f"{config.resume!r} does not exist: use auto, never, or a checkpoint dir")
    model = config.model
    if model.path is not None and not _looks_like_hub_id(model.path) and not os.path.isdir(model.path):
        raise ConfigError("model.path", f"{model.path!r} is not a directory: give a local model dir with config.json")
    has_config = model.path is not None and os.path.isfile(os.path.join(model.path, "config.json"))
    if model.path is not None and os.path.isdir(model.path) and not has_config:
        raise ConfigError("model.path", f"{model.path!r} has no config.json: give a Hugging Face model dir")
    if not model.trust_remote_code:
        for key, directory in (("model.path", model.path), ("model.tokenizer", model.tokenizer)):
            shipped = shipped_code(directory)
            if shipped:
                raise ConfigError("model.trust_remote_code", f"{key} {directory!r} ships its own Python code "
                                  f"({shipped}); it runs only with model.trust_remote_code=true: set that if you "
                                  "trust its source")
    if (config.data.path and not any(ch in config.data.path for ch in "*?[") and not os.path.exists(config.data.path)
            and not _looks_like_hub_id(config.data.path)):
        raise ConfigError("data.path", f"{config.data.path!r} does not exist")
    replay = config.data.replay.path
    if replay and not any(ch in replay for ch in "*?[") and not os.path.exists(replay):
        raise ConfigError("data.replay.path", f"{replay!r} does not exist")
    if replay and config.objective.name != "sft":
        raise ConfigError("data.replay.path", f"replay mixes general data into supervised fine-tuning; "
                          f"objective.name={config.objective.name} trains on preference data only: leave data.replay "
                          "unset (or train with objective.name=sft)")
    _check_regularize(config)
    if config.registry.auto:
        from importlib.util import find_spec

        if find_spec("mlflow") is None:  # found now, not after hours of training
            raise ConfigError("registry.auto", "registers the run in MLflow, which is not installed: pip install "
                              "'trainer[registry]' (or leave registry.auto=false and register later)")
    if config.data.val_path and not os.path.exists(config.data.val_path):
        raise ConfigError("data.val_path", f"{config.data.val_path!r} does not exist")
    forgetting = config.eval.forgetting_path
    if forgetting and not any(ch in forgetting for ch in "*?[") and not os.path.exists(forgetting):
        raise ConfigError("eval.forgetting_path", f"{forgetting!r} does not exist")
    if config.eval.max_forgetting and not forgetting:
        raise ConfigError("eval.max_forgetting", "needs eval.forgetting_path: the data whose loss it watches")
    if config.eval.early_stopping_patience and not config.eval.every_n_steps:
        raise ConfigError("eval.early_stopping_patience",
                          "needs periodic evaluation: set eval.every_n_steps > 0 (or patience 0 to disable)")
    from trainer.config.defaults import sdpa_refusal

    if config.model.attn_implementation == "sdpa" and sdpa_refusal(config.model):
        raise ConfigError("model.attn_implementation", f"sdpa cannot apply {sdpa_refusal(config.model)}: use eager "
                          "(or flash_attention_2 on a GPU)")
    from trainer.kernels import check_available

    check_available(config.model.kernels)
    from trainer.text_metrics import missing_package

    package = missing_package(config.eval.metrics)
    if package:
        raise ConfigError("eval.metrics", f"{', '.join(config.eval.metrics)} needs the {package} package, which is not "
                          "installed: pip install -e '.[eval]' (or leave bleu/rouge out)")
    if config.strategy.name == "fsdp" and config.train.precision == "fp16":
        raise ConfigError("train.precision", "fp16 is not supported with strategy=fsdp (no loss scaling there): "
                          "use bf16, or a DeepSpeed strategy for fp16")
    if config.train.compile and config.strategy.name not in COMPILE_STRATEGIES:
        raise ConfigError("train.compile", f"is supported with strategy={', '.join(COMPILE_STRATEGIES)}, not "
                          f"{config.strategy.name} (DeepSpeed's own hooks wrap every module): set train.compile=false "
                          "or choose one of those")
    micro, global_batch = config.train.micro_batch_size, config.train.global_batch_size
    world = getattr(config.launcher, "world_size", 1)
    if config.strategy.name == "single" and world > 1:
        raise ConfigError("strategy", f"single runs one process, but the launcher asks for {world}: "
                          "choose strategy=ddp, fsdp or zero1/zero2/zero3")
    if global_batch % (micro * world):
        raise ConfigError("train.global_batch_size", f"{global_batch} is not a multiple of micro_batch_size x "
                          f"world size = {micro} x {world}")
    check_peft_optim_strategy(config)


# Which combinations of PEFT method, optimizer and strategy run, and why the others are refused before launch
# (docs/peft.md has the table; each refusal was tried on CPU or is argued in its message).
BITSANDBYTES_OPTIMIZERS = ("adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit")
_GATHER_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}  # train.precision -> dtype FSDP2/ZeRO-3 gathers in


def _check_expert_lora(config: Config, planned_strategy: str) -> None:
    """peft.experts=true needs an MoE model (known from its config.json before anything loads) and a strategy that
    does not shard the expert weights."""
    from trainer.config.defaults import model_architecture

    refused = experts_refusal(planned_strategy)
    if refused:
        raise ConfigError(*refused)
    arch = model_architecture(config.model)
    if arch and not any(arch.get(key) for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise ConfigError("peft.experts", f"{arch.get('model_type', 'this model')} has no experts (no "
                          "num_local_experts in its config): set peft.experts=false")


def check_embedding_on_host(config: Config, planned_strategy: str) -> None:
    """train.embedding_on_host needs a frozen, untied input embedding that every rank holds whole. PLANNED_STRATEGY
    auto: checked before auto chooses (the method and the model), so that auto never trades the method for it."""
    from trainer.config.defaults import model_architecture
    from trainer.plan.params import ties_embeddings

    tied = ties_embeddings(model_architecture(config.model))
    refused = host_embedding_refusal(planned_strategy, config.peft.name, tied)
    if refused:
        raise ConfigError(*refused)
    from trainer.freezing import EMBEDDING_NAMES

    trained = sorted(set(getattr(config.peft, "modules_to_save", None) or ()) & set(EMBEDDING_NAMES))
    if trained:
        raise ConfigError("train.embedding_on_host", f"peft.modules_to_save trains the input embedding "
                          f"({', '.join(trained)}) on the GPU: leave it out, or set train.embedding_on_host=false")


def check_peft_optim_strategy(config: Config) -> None:
    """QLoRA, bitsandbytes optimizers, prompt learning and freezing against the strategy and precision."""
    import importlib.util

    peft, optim, strategy, train = config.peft, config.optim, config.strategy, config.train
    name, stage = strategy.name, getattr(strategy, "stage", 0)
    deepspeed = name.startswith("zero")
    bnb_optimizer = optim.name in BITSANDBYTES_OPTIMIZERS
    if (peft.name == "qlora" or bnb_optimizer) and importlib.util.find_spec("bitsandbytes") is None:
        key = "peft" if peft.name == "qlora" else "optim.name"
        raise ConfigError(key, "needs bitsandbytes, which is not installed: pip install 'trainer[qlora]'")
    planned = "fsdp_offload" if name == "fsdp" and strategy.cpu_offload else name
    refused = refusal(planned, peft.name, optim.name, param_offload=deepspeed and strategy.offload_param != "none")
    if refused:
        raise ConfigError(*refused)
    if getattr(peft, "experts", False):
        _check_expert_lora(config, planned)
    if train.embedding_on_host:
        check_embedding_on_host(config, planned)
    if peft.name == "qlora":
        if peft.quantize_lm_head:
            from trainer.config.defaults import model_architecture

            if model_architecture(config.model).get("tie_word_embeddings"):
                raise ConfigError("peft.quantize_lm_head", "this model's lm_head is its embedding "
                                  "(tie_word_embeddings), which stays in the compute dtype: set "
                                  "peft.quantize_lm_head=false")
        if config.model.init == "random":
            raise ConfigError("peft", "qlora quantises a pretrained checkpoint while loading it; model.init=random has "
                              "none (use peft=lora to train fresh weights)")
        sharded = name == "fsdp" or (deepspeed and stage == 3)
        want = _GATHER_DTYPE[train.precision]
        if sharded and peft.quant_storage != want:
            raise ConfigError("peft.quant_storage", f"{peft.quant_storage} cannot be sharded by strategy={name}: it "
                              f"gathers every parameter of a layer as one {want} tensor (train.precision), and would "
                              f"cast the packed 4-bit bytes; set peft.quant_storage={want}")
    if peft.name in ("prompt_tuning", "prefix_tuning") and config.data.packing and (
            config.model.attn_implementation == "flash_attention_2"):
        raise ConfigError("data.packing", f"{peft.name} with packed rows needs a mask that shows every sample the "
                          "virtual tokens; flash_attention_2 packs without masks: use model.attn_implementation=sdpa "
                          "or data.packing=false")
    if deepspeed and strategy.offload_optimizer != "none" and (bnb_optimizer or optim.layer_lr_decay != 1.0):
        key = "optim.name" if bnb_optimizer else "optim.layer_lr_decay"
        raise ConfigError(key, "ZeRO optimizer offload replaces the optimizer by DeepSpeed's CPU Adam (one learning "
                          "rate, fp32 moments): use optim.name=adamw and optim.layer_lr_decay=1.0, or "
                          "strategy.offload_optimizer=none")
    if deepspeed and bnb_optimizer and not strategy.deepspeed_overrides.get("zero_allow_untested_optimizer"):
        raise ConfigError("optim.name", f"DeepSpeed refuses {optim.name} (bitsandbytes) unless told to accept an "
                          "optimizer it has not tested; it trains under ZeRO-2/3 here: add "
                          "+strategy.deepspeed_overrides.zero_allow_untested_optimizer=true")
    if optim.freeze.unfreeze_every_n_steps and name not in ("single", "auto"):
        raise ConfigError("optim.freeze.unfreeze_every_n_steps", f"gradual unfreezing switches requires_grad during "
                          f"training, which strategy={name} fixes when it wraps the model: use strategy=single, or "
                          "freeze statically (optim.freeze.first_n_layers / patterns)")


def _looks_like_hub_id(path: str) -> bool:
    """`org/name` with no leading ./ or / and not present locally: only meaningful where a hub is reachable."""
    if os.path.isabs(path) or path.startswith(".") or os.path.exists(path):
        return False
    return path.count("/") == 1 and os.environ.get("HF_HUB_OFFLINE", "0") != "1" and not os.environ.get(
        "TRAINER_OFFLINE")


# The penalty needs every trainable weight whole on each rank (trainer/regularize.py); strategy=auto is checked
# again once resolved (launch/auto_strategy.py).
REGULARIZE_STRATEGIES = ("single", "ddp", "auto")


def _check_regularize(config: Config) -> None:
    reg = config.regularize
    if reg.fisher_path and not any(ch in reg.fisher_path for ch in "*?[") and not os.path.exists(reg.fisher_path):
        raise ConfigError("regularize.fisher_path", f"{reg.fisher_path!r} does not exist")
    if not reg.active:
        return
    key = "regularize.ewc_lambda" if reg.ewc_lambda > 0 else "regularize.l2_lambda"
    if config.strategy.name not in REGULARIZE_STRATEGIES:
        raise ConfigError(key, f"the penalty needs every trainable weight whole on each rank: use strategy=single or "
                          f"ddp (strategy {config.strategy.name} shards them), or data.replay against forgetting")
    if config.objective.name != "sft":
        raise ConfigError(key, f"the penalty is for supervised fine-tuning; objective.name={config.objective.name} "
                          "starts from the SFT model it aligns: leave regularize unset")
    path = reg.fisher_path or config.data.replay.path
    if reg.ewc_lambda > 0 and not path:
        raise ConfigError("regularize.fisher_path", "EWC estimates the Fisher information on general data: set "
                          "regularize.fisher_path (any data format; data.replay.path is used when set)")
