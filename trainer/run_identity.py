"""The run dir's identity: `config.yaml`, written at the run's first start, says what the run is.

A later `trainer train` on the same run dir (a resume, a relaunch after a crash, a requeue) is compared with it
key by key, before anything is written or launched:

- identity keys (the model, the PEFT method and its shape, the data and its order, the seed, the tokenizer and
  template, sequence length and packing, precision, the optimizer's state layout, a strategy change that the
  checkpoint cannot be resharded to) are refused in one line naming the keys: the checkpoints and the metrics so
  far belong to those values, so changing them would load the wrong tensors, or silently train another run;
- optimizer hyperparameters (OPT_IN_KEYS) are restored from the checkpoint by a resume, so a new value is refused
  unless the user opts in with `run.allow_changes=[optim.lr]`; then the resumed run applies it (recipe.py);
- everything else (length of the run, eval/checkpoint cadence, logging, launcher, paths) is safe: applied and
  stated on one line.

config.yaml is never touched on a refusal. An accepted change rewrites it atomically (the identity keys are equal
by construction) and appends one line to `resume_history.jsonl` (time, host, changes as [old, new]), so the
values the run started with stay recoverable. A run dir where nothing has trained yet (no checkpoint, no final/,
no logged step) has no identity to keep: a new config simply replaces its config.yaml.
"""

from __future__ import annotations

import json
import os
import socket
import time
from typing import Any

CONFIG_NAME = "config.yaml"
HISTORY_NAME = "resume_history.jsonl"

# Optimizer hyperparameters that a resume restores from the checkpoint (the LR scheduler's base LRs, each param
# group's settings) and that recipe.py re-applies from the config when the user opts in.
OPT_IN_KEYS = ("optim.lr", "optim.weight_decay", "optim.betas", "optim.eps", "optim.max_grad_norm",
               "optim.scheduler", "optim.warmup_ratio", "optim.min_lr_ratio")

# Keys (or key prefixes) whose change breaks the run, each with why; the longest matching prefix decides.
IDENTITY: dict[str, str] = {
    "seed": "the data order and the initial weights",
    "model": "the base model whose weights the checkpoints extend",
    "peft": "the adapters' method and shape: the checkpoints' tensors",
    "data": "the training data and its order",
    "train.global_batch_size": "the data order (rows per step)",
    "train.precision": "the weights' and optimizer state's dtypes",
    "optim.name": "the optimizer state's layout",
    "optim.freeze": "which parameters train (the optimizer state)",
    "optim.layer_lr_decay": "the optimizer's parameter groups",
    "regularize": "the penalty against forgetting and the weights it anchors (anchor.safetensors, from step 0)",
}
# Exceptions inside identity prefixes: labels and settings that change neither weights nor data.
SAFE: tuple[str, ...] = ("model.name", "model.attn_implementation", "model.trust_remote_code", "data.cache",
                         "data.strict")
# Per-invocation directives: neither identity nor worth stating as a change.
QUIET: tuple[str, ...] = ("resume", "run.allow_changes")
# DCP strategies reshard each other's checkpoints; DeepSpeed reshards its own stage (universal checkpoint).
_DCP_STRATEGIES = ("single", "ddp", "fsdp")


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: leaf value}; lists are leaves (compared whole)."""
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
        return flat
    return {prefix: value}


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def classify(key: str) -> str:
    """"identity", "opt_in", "quiet" or "safe"."""
    if any(_matches(key, q) for q in QUIET):
        return "quiet"
    if key in OPT_IN_KEYS:
        return "opt_in"
    if any(_matches(key, s) for s in SAFE):
        return "safe"
    if any(_matches(key, prefix) for prefix in IDENTITY):
        return "identity"
    return "safe"


def _strategy_change(old: dict, new: dict) -> str | None:
    """Why the strategy change cannot load the run's checkpoints, or None (reshardable, or unchanged)."""
    before, after = (old.get("strategy") or {}), (new.get("strategy") or {})
    a, b = before.get("name"), after.get("name")
    if a == b or a is None:
        return None
    if a in _DCP_STRATEGIES and b in _DCP_STRATEGIES:
        return None
    if str(a).startswith("zero") and str(b).startswith("zero") and before.get("stage") == after.get("stage"):
        return None  # zero3 <-> zero3_offload: same partition layout
    return f"strategy={b}: the checkpoints were written by strategy={a}, whose format it cannot load"


def compare(old: dict, new: dict, allow_changes: list[str] | tuple = ()) -> tuple[list[str], dict[str, list]]:
    """(refusals, accepted changes {key: [old, new]}) between the run's config and the new one (plain dicts)."""
    flat_old, flat_new = flatten(old), flatten(new)
    refused, accepted = [], {}
    for key in sorted(set(flat_old) | set(flat_new)):
        if key not in flat_old or key not in flat_new:
            continue  # a key this version of the schema added or dropped: nothing to compare with
        before, after = flat_old[key], flat_new[key]
        if before == after or key.startswith("strategy."):
            continue
        kind = classify(key)
        if kind == "identity":
            refused.append(f"{key}={_show(after)} (the run has {_show(before)}: {_why(key)})")
        elif kind == "opt_in" and key not in allow_changes:
            refused.append(f"{key}={_show(after)} (the run has {_show(before)}; a resume restores it from the "
                           f"checkpoint: add run.allow_changes=[{key}] to change it)")
        elif kind != "quiet":
            accepted[key] = [before, after]
    strategy = _strategy_change(old, new)
    if strategy:
        refused.append(strategy)
    elif flat_old.get("strategy.name") is not None:
        accepted.update({k: [flat_old[k], flat_new[k]] for k in sorted(set(flat_old) & set(flat_new))
                         if k.startswith("strategy.") and flat_old[k] != flat_new[k]})
    return refused, accepted


def _why(key: str) -> str:
    prefix = max((p for p in IDENTITY if _matches(key, p)), key=len)
    return IDENTITY[prefix]


def _show(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def has_trained(run_dir: str) -> bool:
    """Whether the run dir holds anything trained: checkpoints (even uncommitted), final/, or a logged step."""
    checkpoints = os.path.join(run_dir, "checkpoints")
    if (os.path.isdir(checkpoints) and os.listdir(checkpoints)) or os.path.isdir(os.path.join(run_dir, "final")):
        return True
    metrics = os.path.join(run_dir, "metrics.jsonl")
    if os.path.isfile(metrics):
        with open(metrics, encoding="utf-8", errors="replace") as fh:
            return any('"step"' in line for line in fh)
    return False


def read_config_dict(path: str) -> dict:
    from omegaconf import OmegaConf

    from trainer.errors import UserError

    try:
        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # any YAML or OmegaConf error: say which file, not a traceback
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]}); restore the run's config.yaml") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: not a config (a YAML mapping expected); restore the run's config.yaml")
    return raw


def check_resume(config, run_dir: str, log=print) -> bool:
    """Compare `config` with the run's identity; raise one UserError for refused changes. Returns whether
    config.yaml must be (re)written: a new run dir, an untrained one, or accepted changes."""
    from trainer.config.frozen import config_to_dict
    from trainer.errors import UserError

    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isfile(path) or not has_trained(run_dir):
        return True
    old = read_config_dict(path)
    refused, accepted = compare(old, config_to_dict(config), config.run.allow_changes)
    if refused:
        raise UserError(f"{path}: this run was started with other values, which a resume cannot change: "
                        f"{'; '.join(refused)}. Give the run's values, or train in another run.dir")
    if not accepted:
        return False
    log("resuming with changed settings: " + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in
                                                         accepted.items()) + f" (recorded in {HISTORY_NAME})")
    record_history(run_dir, accepted)
    return True


def record_history(run_dir: str, changes: dict[str, list]) -> None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": socket.gethostname(), "pid": os.getpid(),
             "changes": changes}
    with open(os.path.join(run_dir, HISTORY_NAME), "a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def check_checkpoint_source(config, checkpoint: str) -> None:
    """`resume=PATH`: the checkpoint's own run config (its run_config.yaml, else its run's config.yaml) must have
    the same identity as this run, so that its tensors fit the model built here."""
    from trainer.config.frozen import config_to_dict
    from trainer.errors import UserError

    candidates = [os.path.join(checkpoint, "run_config.yaml"),
                  os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(checkpoint))), CONFIG_NAME)]
    source = next((c for c in candidates if os.path.isfile(c)), None)
    if source is None:
        return  # a checkpoint from elsewhere: the strategy's loader is the only judge
    refused, _ = compare(read_config_dict(source), config_to_dict(config), OPT_IN_KEYS)
    if refused:
        raise UserError(f"resume={checkpoint}: it was written by a run with other values ({source}): "
                        f"{'; '.join(refused)}. Give that run's values, or export it (`trainer export {checkpoint} "
                        "--to hf|adapter --out DIR`) and start a new run from that")
