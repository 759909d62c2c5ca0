"""Trainable parameter counts for full fine-tuning and the PEFT methods, matching what ``peft`` creates.

Per targeted linear module (``in`` -> ``out``, counted once per layer and once per expert for MoE experts):

```
lora / qlora   r * (in + out)                   A is r x in, B is out x r; qlora trains the same adapters
dora           r * (in + out) + out             plus one magnitude per output feature
ia3            out                              one scaling vector; in for feed-forward modules (down_proj / w2)
prompt_tuning  num_virtual_tokens * H           one embedding per virtual token
prefix_tuning  num_virtual_tokens * 2 * L * kv_dim
               a key and a value prefix per layer, sized to the KV heads (peft does this for grouped-query attention)
none           every parameter of the model
```

Target modules are Hugging Face module names (``q_proj``, ``down_proj``; phi3 uses the fused ``qkv_proj`` and
``gate_up_proj``), a comma-separated string of them, or ``"all-linear"``: every linear layer in the decoder layers
(the MoE router included, as peft does), never lm_head. Like peft, names that match nothing are tolerated as long as
one name matches; they are returned in ``TrainableCount.unmatched`` so the caller can warn. Regular expressions are
not supported.

MoE (Mixtral under transformers 5): the experts are 3-D parameters, gate and up fused into ``gate_up_proj``. peft
converts the transformers 4 names: ``w1`` + ``w3`` (both, or neither) become one adapter on ``gate_up_proj`` with
rank 2r, ``w2`` becomes ``down_proj``, ``gate`` is the router. Each expert gets its own A and B, so expert adapters
count ``num_experts`` times: ``E * 2r * (H + 2I)`` for gate_up_proj and ``E * r * (I + H)`` for down_proj. peft has
no DoRA for expert parameters, and its IA3 does not reach them (its default mixtral target ``w2`` matches nothing
in transformers 5); we count the IA3 vector peft intends, ``E * I`` per layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from trainer.plan.params import LinearModule, ParamCount

PEFT_METHODS = ("none", "lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")
ADAPTER_METHODS = ("lora", "dora", "qlora")
ALL_LINEAR = "all-linear"
DEFAULT_TARGET_MODULES = ALL_LINEAR  # for lora/dora/qlora; the QLoRA paper's recommendation

# IA3 defaults mirror peft's per-family table; families peft has no entry for must name their targets.
_IA3_DEFAULT_TARGETS = {
    "llama": ("k_proj", "v_proj", "down_proj"),
    "mistral": ("k_proj", "v_proj", "down_proj"),
    "mixtral": ("k_proj", "v_proj", "w2"),
    "gemma": ("q_proj", "v_proj", "down_proj"),
    "gemma2": ("q_proj", "v_proj", "down_proj"),
    "qwen2": ("q_proj", "v_proj", "down_proj"),
}
# IA3 scales the *input* of feed-forward output projections and the output of everything else.
_IA3_FEEDFORWARD = frozenset({"down_proj", "w2"})


@dataclass(frozen=True)
class TrainableCount:
    """Trainable parameters for one fine-tuning method, with where they live."""

    method: str
    total: int
    per_module: dict[str, int] = field(default_factory=dict)  # module name -> trainable params over all layers
    targeted: tuple[LinearModule, ...] = ()  # modules that carry an adapter (or IA3 vector)
    unmatched: tuple[str, ...] = ()  # requested names that matched no module of this architecture
    rank: int = 0

    @property
    def is_full(self) -> bool:
        return self.method == "none"


def normalise_method(method: str) -> str:
    """Accept "full" as a synonym of "none" (no PEFT: every weight trains)."""
    method = "none" if method in ("full", None) else method
    if method not in PEFT_METHODS:
        raise ValueError(f"peft_method must be one of {', '.join(PEFT_METHODS)} (or 'full'), got {method!r}")
    return method


def _target_names(target_modules: str | Sequence[str]) -> list[str]:
    if isinstance(target_modules, str):
        return [name.strip() for name in target_modules.split(",") if name.strip()]
    return [str(name) for name in target_modules]


def _is_targeted(module: LinearModule, names: list[str]) -> bool:
    if module.name in names:
        return True
    hits = [alias for alias in module.aliases if alias in names]
    if module.aliases_fused and hits and len(hits) < len(module.aliases):
        missing = [alias for alias in module.aliases if alias not in hits]
        raise ValueError(
            f"target_modules names {hits} but not {missing}: they are fused into {module.name}, so target both"
        )
    return bool(hits)


def resolve_targets(
    params: ParamCount, target_modules: str | Sequence[str]
) -> tuple[tuple[LinearModule, ...], tuple[str, ...]]:
    """The decoder-layer linear modules selected by ``target_modules``, and the names that matched nothing."""
    names = _target_names(target_modules)
    if not names:
        raise ValueError("target_modules is empty: name at least one module (e.g. q_proj,v_proj) or 'all-linear'")
    if names == [ALL_LINEAR]:
        return params.linear_modules, ()
    matched = tuple(m for m in params.linear_modules if _is_targeted(m, names))
    unmatched = tuple(n for n in names if not any(m.matches(n) for m in params.linear_modules))
    if not matched:
        available = ", ".join(m.name for m in params.linear_modules)
        raise ValueError(
            f"target_modules {names} match no module of {params.model_type} (its linear modules: {available})"
        )
    return matched, unmatched


def count_trainable(
    params: ParamCount,
    peft_method: str,
    *,
    r: int = 16,
    target_modules: str | Sequence[str] | None = None,
    num_virtual_tokens: int = 20,
    experts: bool = False,
) -> TrainableCount:
    """Count what a fine-tuning method trains on the architecture counted in ``params``.

    ``r`` is the LoRA/DoRA rank; ``target_modules`` defaults to ``"all-linear"`` for lora/dora/qlora and to peft's
    per-family defaults for ia3; ``num_virtual_tokens`` applies to prompt and prefix tuning. ``experts``: the fused
    MoE expert weights carry LoRA too, as PEFT's target_parameters gives them (peft.experts): rank r per expert,
    ``E * r * (in + out)`` per layer and weight.
    """
    method = normalise_method(peft_method)
    layers = params.num_layers
    if method == "none":
        return TrainableCount(method, params.total, {"all": params.total})
    if method in ("prompt_tuning", "prefix_tuning"):
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be positive, got {num_virtual_tokens}")
        if method == "prompt_tuning":
            total = num_virtual_tokens * params.hidden_size
        else:
            total = num_virtual_tokens * 2 * layers * params.kv_dim
        return TrainableCount(method, total, {method: total})

    if method == "ia3" and target_modules is None:
        if params.model_type not in _IA3_DEFAULT_TARGETS:
            available = ", ".join(m.name for m in params.linear_modules)
            raise ValueError(
                f"peft has no default IA3 target modules for {params.model_type}; set target_modules "
                f"(its linear modules: {available})"
            )
        target_modules = _IA3_DEFAULT_TARGETS[params.model_type]
    targeted, unmatched = resolve_targets(params, target_modules or DEFAULT_TARGET_MODULES)

    per_module: dict[str, int] = {}
    for module in targeted:
        if method == "ia3":
            feedforward = _is_feedforward(module)
            per_copy = module.in_features if feedforward else module.out_features
        else:
            if r <= 0:
                raise ValueError(f"lora r must be positive, got {r}")
            per_copy = r * module.rank_multiplier * (module.in_features + module.out_features)
            if method == "dora":
                if module.copies > 1:
                    raise ValueError(f"peft has no DoRA for MoE expert parameters ({module.name}); target others")
                per_copy += module.out_features
        per_module[module.name] = layers * module.copies * per_copy
    if experts and method in ADAPTER_METHODS:
        fused = tuple(m for m in params.linear_modules if m.copies > 1 and m.name not in per_module)
        if not fused:
            raise ValueError(f"{params.model_type} has no fused expert weights for LoRA (peft.experts)")
        for module in fused:
            per_module[module.name] = layers * module.copies * r * (module.in_features + module.out_features)
        targeted = (*targeted, *fused)
    return TrainableCount(
        method,
        sum(per_module.values()),
        per_module,
        targeted,
        unmatched,
        rank=r if method in ADAPTER_METHODS else 0,
    )


def _is_feedforward(module: LinearModule) -> bool:
    return module.name in _IA3_FEEDFORWARD or bool(_IA3_FEEDFORWARD & set(module.aliases))


def module_saves_input(trainable: TrainableCount, module: LinearModule) -> bool:
    """Whether backward needs this module's input: its weight trains, or an adapter reads the input."""
    if trainable.is_full:
        return True
    if trainable.method == "ia3":
        return module in trainable.targeted and _is_feedforward(module)
    return trainable.method in ADAPTER_METHODS and module in trainable.targeted


def ia3_scales_output(trainable: TrainableCount, module: LinearModule) -> bool:
    """IA3 on a non-feed-forward module multiplies its output, which backward then needs."""
    return trainable.method == "ia3" and module in trainable.targeted and not module_saves_input(trainable, module)
