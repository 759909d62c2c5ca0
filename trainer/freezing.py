"""Which parameters train: freezing by name or by depth, and gradual unfreezing on a schedule.

Depth numbers the model from the input: 0 for the token embeddings, i + 1 for decoder layer i, L + 1 for
everything after the last layer (final norm, lm_head) and for anything not inside a layer (PEFT's virtual-token
encoders). The optimizer's layer-wise learning-rate decay reads the same depths (trainer/optim.py).

Static freezing runs once, on the built model, before the strategy wraps it and before the optimizer is built, so
frozen parameters get neither gradients nor optimizer state. Gradual unfreezing needs its parameters in the
optimizer from the start (an optimizer skips parameters whose gradient is None, so a frozen one costs nothing
until it thaws): it is applied after setup and moved forward by `on_step`, a pure function of the step, so a
resumed run lands on the same schedule.
"""

from __future__ import annotations

import logging
import re
from typing import Callable

from trainer.errors import ConfigError

log = logging.getLogger(__name__)

# Decoder layers in Hugging Face module trees: model.layers.N (llama, mistral, qwen, gemma, phi3), transformer.h.N
# (gpt2, falcon), gpt_neox.layers.N, blocks.N.
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
EMBEDDING_NAMES = ("embed_tokens", "wte", "word_embeddings", "embed_in")


def layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def count_layers(model) -> int:
    indices = {layer_index(name) for name, _ in model.named_parameters()}
    indices.discard(None)
    return max(indices) + 1 if indices else 0


def depth(name: str, num_layers: int) -> int:
    """0 = embeddings, i + 1 = decoder layer i, num_layers + 1 = after the layers (see the module docstring)."""
    index = layer_index(name)
    if index is not None:
        return index + 1
    if any(f"{part}." in name or name.endswith(part) for part in EMBEDDING_NAMES):
        return 0
    return num_layers + 1


def apply_static_freezing(model, cfg) -> int:
    """Turn off gradients for parameters matching `cfg.patterns` or lying at depth <= `cfg.first_n_layers`.
    Returns the number of parameters frozen. A pattern that matches no trainable parameter is an error: it is
    almost always a typo, and training on silently would update what the user meant to keep."""
    if cfg is None or not (cfg.patterns or cfg.first_n_layers):
        return 0
    num_layers = count_layers(model)
    if cfg.first_n_layers > num_layers:
        raise ConfigError("optim.freeze.first_n_layers", f"{cfg.first_n_layers} is more than the model's "
                          f"{num_layers} decoder layers")
    patterns = [re.compile(p) for p in cfg.patterns]
    matched = [False] * len(patterns)
    frozen = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        hits = [i for i, pattern in enumerate(patterns) if pattern.search(name)]
        for i in hits:
            matched[i] = True
        if hits or (cfg.first_n_layers and depth(name, num_layers) <= cfg.first_n_layers):
            param.requires_grad = False
            frozen += param.numel()
    for i, hit in enumerate(matched):
        if not hit:
            raise ConfigError(f"optim.freeze.patterns.{i}", f"{cfg.patterns[i]!r} matches no trainable parameter "
                              "(names look like model.layers.0.self_attn.q_proj.lora_A.default.weight)")
    return frozen


class NoSchedule:
    def on_step(self, step: int) -> None:
        pass


class GradualUnfreezing:
    """At step s the trainable parameters at depth >= num_layers - s // every_n_steps train; the rest wait.

    Step 0 trains the head and the top decoder layer; each `every_n_steps` one more layer thaws, the embeddings
    last. Only parameters that were trainable when the schedule was built take part (statically frozen ones stay
    frozen)."""

    def __init__(self, model, every_n_steps: int, report: Callable[[str], None] | None = None):
        self.every_n_steps = every_n_steps
        self.num_layers = count_layers(model)
        self.params = [(depth(name, self.num_layers), param) for name, param in model.named_parameters()
                       if param.requires_grad]
        self.report = report or log.info
        self.lowest_open: int | None = None

    def lowest_trainable_depth(self, step: int) -> int:
        return max(0, self.num_layers - step // self.every_n_steps)

    def on_step(self, step: int) -> None:
        lowest = self.lowest_trainable_depth(step)
        if lowest == self.lowest_open:
            return
        for param_depth, param in self.params:
            param.requires_grad = param_depth >= lowest
        self.lowest_open = lowest
        where = "everything" if lowest == 0 else f"decoder layers {lowest - 1}..{self.num_layers - 1} and the head"
        self.report(f"gradual unfreezing at step {step}: training {where}")


def build_freezing_schedule(model, cfg, report: Callable[[str], None] | None = None):
    """The schedule the recipe calls each step (`on_step(step)`); a no-op unless unfreeze_every_n_steps > 0."""
    if cfg is None or not cfg.unfreeze_every_n_steps:
        return NoSchedule()
    return GradualUnfreezing(model, cfg.unfreeze_every_n_steps, report)
