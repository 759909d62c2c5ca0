"""Checks that need the model's files or its architecture, run before anything heavy starts.

Without them a missing tokenizer, missing weights or a mistyped PEFT target surfaces only after the data has been
tokenised and the weights loaded (10-20 s in), as a library's traceback, with a run dir left behind. Here each is
one `ConfigError` naming the key: files are looked at by name, and module names come from the architecture built
on the meta device (no weights are read or allocated).
"""

from __future__ import annotations

import importlib.util
import os

from trainer.config.schema import Config, ModelConfig
from trainer.errors import ConfigError

# What AutoTokenizer can build a tokenizer from (fast tokenizer, sentencepiece, BPE vocab + merges, tiktoken).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "tokenizer.tiktoken")
WEIGHT_SUFFIXES = (".safetensors", ".bin")
# The package each attention implementation needs beyond transformers and torch.
ATTENTION_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def preflight(config: Config, files: bool = True) -> None:
    """Every check below for the model and PEFT sections of a validated config. `files=False` leaves out whether
    the weights and tokenizer are there (for `--cfg job` and a Slurm dry run, which print what would run: the
    files may be copied in before the job starts); the architecture's config.json is still read."""
    if files:
        check_model_files(config.model)
        check_tokenizer_files(config.model)  # a file listing: before the weights' check, which loads transformers
        check_model_weights(config.model)
    check_attention_available(config.model)
    if config.peft.name != "none":
        check_peft_modules(config.model, config.peft)
        check_initial_adapter(config.peft)


def check_model_files(cfg: ModelConfig) -> None:
    """A local model dir holds config.json and weights (unless model.init=random). A path that is not a local dir
    is left to the hub, where one is reachable."""
    if not (cfg.path and os.path.isdir(cfg.path)):
        return
    names = set(os.listdir(cfg.path))
    if "config.json" not in names:
        raise ConfigError("model.path", f"{cfg.path!r} has no config.json; point model.path at the model's dir "
                          "(the one with config.json and the weights)")
    if cfg.init != "random" and not any(name.endswith(WEIGHT_SUFFIXES) for name in names):
        raise ConfigError("model.path", f"{cfg.path!r} holds no weights (*.safetensors or *.bin); "
                          "use model.init=random to start from fresh weights")


def check_model_weights(cfg: ModelConfig) -> None:
    """The weights model.path holds are whole, agree with its config.json, and (pickles) hold tensors only: each
    problem is one line naming the file, where transformers would print a traceback from deep inside its loader."""
    if cfg.init == "random" or not (cfg.path and os.path.isdir(cfg.path)):
        return
    from trainer.weights import check_safetensors_files

    check_safetensors_files(cfg.path)
    names = sorted(os.listdir(cfg.path))
    if any(name.endswith(".safetensors") for name in names):
        _check_shapes_against_config(cfg)
    else:
        for name in names:
            if name.endswith(".bin"):
                _check_pickle_holds_tensors(os.path.join(cfg.path, name))


def _check_shapes_against_config(cfg: ModelConfig) -> None:
    """Every tensor the safetensors headers describe has the shape config.json's architecture gives it."""
    import json
    import struct

    shapes = {name: tuple(param.shape) for name, param in _meta_model(cfg).state_dict().items()}
    for file in sorted(f for f in os.listdir(cfg.path) if f.endswith(".safetensors")):
        path = os.path.join(cfg.path, file)
        with open(path, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))  # whole: checked just before
        for name, entry in header.items():
            wanted = shapes.get(name, shapes.get(name.removeprefix("model.")))
            if isinstance(entry, dict) and wanted is not None and tuple(entry.get("shape", ())) != wanted:
                raise ConfigError("model.path", f"{path}: tensor {name} has shape {tuple(entry['shape'])} but "
                                  f"{os.path.join(cfg.path, 'config.json')} makes it {wanted}; the config.json does "
                                  "not belong to these weights: use the one they were saved with")


def _check_pickle_holds_tensors(path: str) -> None:
    """A `.bin` is a pickle, which can run any code when loaded: torch's restricted loader (what transformers uses)
    must accept it. Memory-mapped, so only the pickle's small object stream is read."""
    import pickle

    import torch

    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # torch's legacy format cannot be mapped
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as err:
        detail = " ".join(str(err).split())
        reason = "it names code to run, not only tensors" if "global" in detail.lower() else "it is not a readable " \
            "PyTorch weights file"
        raise ConfigError("model.path", f"{path}: refused to load ({reason}); never load it with weights_only=False "
                          "unless you made it: use the model's safetensors files, or convert a trusted copy") from None


def check_tokenizer_files(cfg: ModelConfig) -> None:
    """The tokenizer's dir (model.tokenizer, else model.path) holds a file AutoTokenizer can build one from."""
    source, key = (cfg.tokenizer, "model.tokenizer") if cfg.tokenizer else (cfg.path, "model.path")
    if source and os.path.isdir(source) and not set(os.listdir(source)) & set(TOKENIZER_FILES):
        hint = ("set model.tokenizer to a dir that has one (e.g. the base model's)" if key == "model.path"
                else "point it at a dir that has one")
        raise ConfigError(key, f"{source!r} has no tokenizer ({', '.join(TOKENIZER_FILES[:2])}, ...); {hint}")


def check_attention_available(cfg: ModelConfig) -> None:
    package = ATTENTION_PACKAGES.get(cfg.attn_implementation)
    if package and importlib.util.find_spec(package) is None:
        raise ConfigError("model.attn_implementation", f"{cfg.attn_implementation} needs the {package} package, "
                          "which is not installed (it needs a CUDA GPU: pip install flash-attn); use sdpa or auto")


def check_peft_modules(model_cfg: ModelConfig, peft_cfg) -> None:
    """Every module PEFT is told to adapt (`target_modules`) or train in full (`modules_to_save`) exists."""
    targets = getattr(peft_cfg, "target_modules", None)
    saved = list(getattr(peft_cfg, "modules_to_save", None) or [])
    if (targets is None and not saved) or (model_cfg.path and not os.path.isdir(model_cfg.path)):
        return  # nothing named, or a hub id: its module names are checked when it loads
    from trainer.adapters import resolve_target_modules

    model = _meta_model(model_cfg)
    names = [name for name, _ in model.named_modules() if name]
    if targets is not None:
        resolved = resolve_target_modules(model, targets)  # presets (all-linear, ...) are refused there if empty
        if not isinstance(targets, str):
            _require_present(resolved, names, "peft.target_modules", model)
    _require_present(saved, names, "peft.modules_to_save", model)


def check_initial_adapter(peft_cfg) -> None:
    """peft.init_from names an adapter of the configured method and rank (its tensors' shapes follow from them)."""
    path = getattr(peft_cfg, "init_from", None)
    if not path:
        return
    from trainer.adapters import initial_adapter_dir, read_adapter_config

    if not os.path.isdir(path):
        raise ConfigError("peft.init_from", f"{path!r} is not a dir (give an adapter dir, or a run dir with final/)")
    adapter = read_adapter_config(initial_adapter_dir(path))
    if str(adapter.get("peft_type", "")).upper() != "LORA":
        raise ConfigError("peft.init_from", f"{path!r} holds a {adapter.get('peft_type')} adapter; peft.init_from "
                          "continues a LoRA/DoRA/QLoRA adapter")
    if adapter.get("r") != peft_cfg.r:
        raise ConfigError("peft.r", f"is {peft_cfg.r}, but the adapter in peft.init_from has r={adapter.get('r')}: "
                          f"set peft.r={adapter.get('r')}")
    if bool(adapter.get("use_dora")) != (peft_cfg.name == "dora"):
        method = "dora" if adapter.get("use_dora") else "lora or qlora"
        raise ConfigError("peft", f"{peft_cfg.name} cannot continue the adapter in peft.init_from, which is "
                          f"{method}: use peft={method.split()[0]}")


def _require_present(wanted: list[str], names: list[str], key: str, model) -> None:
    """PEFT matches a name against the end of each module's dotted path."""
    from trainer.config.suggest import suggest_option

    leaves = sorted({name.rsplit(".", 1)[-1] for name in names})
    for target in wanted:
        if not any(name == target or name.endswith(f".{target}") for name in names):
            match = suggest_option(target, leaves)
            hint = f"did you mean {match}?" if match else f"the model's modules include {', '.join(leaves[:12])}"
            raise ConfigError(key, f"{target!r} is no module of {type(model).__name__}; {hint}")


def _meta_model(cfg: ModelConfig):
    """The architecture with every parameter on the meta device: module names at no memory cost."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from trainer.model import load_model_config

    try:
        model_config = load_model_config(cfg)
    except (OSError, ValueError) as err:  # no or unrecognised config.json: transformers' multi-line message
        where = cfg.path or "model.arch"
        raise ConfigError("model.path", f"cannot read the architecture of {where!r}: "
                          f"{' '.join(str(err).split())[:300]}") from None
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(model_config, trust_remote_code=cfg.trust_remote_code)
