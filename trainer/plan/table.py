"""What fits where: strategies x fine-tuning methods on a given GPU, the smallest GPU count for each, a
recommendation, ``strategy=auto``, and the text/JSON renderings ``trainer plan`` prints.

Recommendation rule (``what_fits``), among the entries that fit the given GPUs:
1. the requested strategy and method;
2. else the requested method with the cheapest strategy that fits without offload, in order of cost (communication
   and host traffic): single on one GPU; ddp, zero1, zero2, fsdp, zero3 on several;
3. else, on several GPUs, the requested method with zero3_offload or fsdp_offload (fsdp with strategy.cpu_offload)
   (slower, but keeps the method);
4. else the lighter methods in order of fidelity (full, lora, qlora), cheapest strategy first, offload last;
5. else, when nothing fits these GPUs, the entry that needs the fewest GPUs (same order).
Offloaded entries only count as fitting when the host has room, if ``host_memory_gib`` (per node) is given.

``choose_auto_strategy`` resolves ``strategy=auto``: several GPUs -> fsdp, or an offload when fsdp does not fit;
one GPU -> single. When the requested method does not fit it falls back to LoRA on a bf16 base, then to QLoRA.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from trainer.plan.memory import GIB, OFFLOAD_STRATEGIES, STRATEGIES, MemoryEstimate, PlanInputs, estimate_memory

DEFAULT_METHODS = ("none", "lora", "qlora")
FIDELITY_ORDER = ("none", "dora", "lora", "ia3", "prefix_tuning", "prompt_tuning", "qlora")
COST_ORDER = ("single", "ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload", "fsdp_offload")
MULTI_GPU_STRATEGIES = ("ddp", "zero1", "zero2", "fsdp", "zero3", "zero3_offload", "fsdp_offload")
SINGLE_GPU_STRATEGIES = ("single", "zero3_offload", "fsdp_offload")  # what makes sense on one GPU
METHOD_LABELS = {"none": "full"}


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


@dataclass(frozen=True)
class FitCell:
    """One strategy x method entry: its estimate at the given GPU count and the smallest count that fits."""

    strategy: str
    peft_method: str
    estimate: MemoryEstimate | None  # None when the combination cannot run (see error)
    fits: bool
    min_gpus: int | None  # smallest candidate GPU count that fits; None if none up to max_gpus does
    error: str | None = None

    @property
    def bytes_per_gpu(self) -> int | None:
        return self.estimate.total if self.estimate else None


@dataclass(frozen=True)
class FitTable:
    """Every strategy x method entry for one cluster shape, and the recommended entry with its reason."""

    inputs: PlanInputs
    gpu_memory_gib: float
    nodes: int
    gpus_per_node: int
    cells: tuple[FitCell, ...]
    recommendation: FitCell | None
    reason: str
    host_memory_gib: float | None = None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class AutoChoice:
    """What ``strategy=auto`` resolves to, the estimate behind it, and a readable account of the candidates."""

    strategy: str
    peft_method: str
    estimate: MemoryEstimate | None
    fits: bool
    reason: str


def candidate_gpu_counts(gpus_per_node: int, max_gpus: int = 64) -> list[int]:
    """Powers of two up to one node, then whole nodes (powers of two when a node has one GPU), up to ``max_gpus``."""
    powers = [2**i for i in range(max_gpus.bit_length()) if 2**i <= max_gpus]
    if gpus_per_node == 1:
        return powers
    counts = [count for count in powers if count < gpus_per_node] + [gpus_per_node]
    return counts + list(range(2 * gpus_per_node, max_gpus + 1, gpus_per_node))


def _layout(count: int, gpus_per_node: int) -> tuple[int, int]:
    """(nodes, gpus_per_node) for ``count`` GPUs: partial nodes below one node, whole nodes beyond."""
    return (1, count) if count <= gpus_per_node else (count // gpus_per_node, gpus_per_node)


def _try_estimate(inputs: PlanInputs, **changes) -> tuple[MemoryEstimate | None, str | None]:
    """Estimate a variant of ``inputs``; a combination that cannot run comes back as (None, why)."""
    try:
        return estimate_memory(inputs.replace(**changes) if changes else inputs), None
    except ValueError as error:
        return None, str(error)


def _variant(inputs: PlanInputs, strategy: str, method: str, count: int, gpus_per_node: int) -> dict:
    nodes, per_node = _layout(count, gpus_per_node)
    # A requested weight_precision belongs to the requested method; the other methods use their defaults.
    weights = inputs.weight_precision if method == inputs.peft_method else None
    return {"strategy": strategy, "peft_method": method, "weight_precision": weights, "nodes": nodes,
            "gpus_per_node": per_node}


def _cell(inputs: PlanInputs, strategy: str, method: str, memory: tuple[float, float | None], world: int,
          gpus_per_node: int, max_gpus: int) -> FitCell:
    here = 1 if strategy == "single" else world
    estimate, error = _try_estimate(inputs, **_variant(inputs, strategy, method, here, gpus_per_node))
    if estimate is None:
        return FitCell(strategy, method, None, False, None, error)
    counts = [1] if strategy == "single" else candidate_gpu_counts(gpus_per_node, max_gpus)
    if strategy == "ddp":
        counts = [count for count in counts if count > 1]  # ddp on one GPU is just single
    min_gpus = None
    for count in counts:
        candidate, _ = _try_estimate(inputs, **_variant(inputs, strategy, method, count, gpus_per_node))
        if candidate is not None and candidate.fits(*memory):
            min_gpus = count
            break
    return FitCell(strategy, method, estimate, estimate.fits(*memory), min_gpus)


def _preference(cell: FitCell, requested: str, world: int) -> tuple[int, int, int]:
    same, offload = cell.peft_method == requested, cell.strategy in OFFLOAD_STRATEGIES
    if same:
        tier = 2 if offload else 1
        tier = 4 if offload and world == 1 else tier  # one GPU: prefer LoRA/QLoRA to offloading (as auto does)
    else:
        tier = 4 if offload else 3
    method_rank = -1 if same else FIDELITY_ORDER.index(cell.peft_method)
    return tier, method_rank, COST_ORDER.index(cell.strategy)


def _recommend(cells: Sequence[FitCell], inputs: PlanInputs, world: int) -> tuple[FitCell | None, str]:
    usable = SINGLE_GPU_STRATEGIES if world == 1 else MULTI_GPU_STRATEGIES
    for cell in cells:
        if cell.strategy == inputs.strategy and cell.peft_method == inputs.peft_method and cell.fits:
            return cell, f"the requested {cell.strategy} + {method_label(cell.peft_method)} fits"
    fitting = [c for c in cells if c.fits and c.strategy in usable]
    fitting.sort(key=lambda c: _preference(c, inputs.peft_method, world))
    if fitting:
        best = fitting[0]
        return best, (
            f"{inputs.strategy} + {method_label(inputs.peft_method)} does not fit; {best.strategy} + "
            f"{method_label(best.peft_method)} is the cheapest that fits {world} GPU(s)"
        )
    growable = [c for c in cells if c.min_gpus is not None]
    if growable:
        best = min(growable, key=lambda c: (c.min_gpus, *_preference(c, inputs.peft_method, world)))
        return best, (
            f"nothing fits {world} GPU(s); {best.strategy} + {method_label(best.peft_method)} fits from "
            f"{best.min_gpus} GPUs"
        )
    return None, "nothing fits at any GPU count tried; shorten seq_len or micro_batch_size, or use a bigger GPU"


def what_fits(
    inputs: PlanInputs,
    gpu_memory_gib: float,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    strategies: Sequence[str] = STRATEGIES,
    max_gpus: int = 64,
    host_memory_gib: float | None = None,
) -> FitTable:
    """Tabulate every strategy x method on ``nodes x gpus_per_node`` GPUs of ``gpu_memory_gib`` GiB each.

    ``nodes``/``gpus_per_node`` default to the ones in ``inputs``; ``max_gpus`` bounds the search for each entry's
    smallest GPU count; ``host_memory_gib`` (per node), when given, must hold the offloaded state. The
    recommendation rule is in the module docstring.
    """
    nodes = nodes or inputs.nodes
    gpus_per_node = gpus_per_node or inputs.gpus_per_node
    world = nodes * gpus_per_node
    methods = tuple(dict.fromkeys([*methods, inputs.peft_method]))  # the requested method always gets a row
    cells = tuple(
        _cell(inputs, strategy, method, (gpu_memory_gib, host_memory_gib), world, gpus_per_node, max_gpus)
        for method in methods
        for strategy in strategies
    )
    if inputs.strategy == "auto":
        auto = choose_auto_strategy(inputs.replace(nodes=nodes, gpus_per_node=gpus_per_node), gpu_memory_gib,
                                    host_memory_gib)
        recommendation = next(
            (c for c in cells if (c.strategy, c.peft_method) == (auto.strategy, auto.peft_method) and c.fits), None
        )
        reason = f"strategy=auto: {auto.reason}"
    else:
        recommendation, reason = _recommend(cells, inputs, world)
    return FitTable(inputs, gpu_memory_gib, nodes, gpus_per_node, cells, recommendation, reason, host_memory_gib)


def _gib(num_bytes: float) -> str:
    return f"{num_bytes / GIB:.1f} GiB"


def choose_auto_strategy(inputs: PlanInputs, gpu_memory_gib: float, host_memory_gib: float | None = None) -> AutoChoice:
    """Pick strategy (and, if needed, a lighter PEFT method) for ``strategy=auto`` on ``inputs``' GPUs.

    Several GPUs: fsdp, else zero3_offload, else fsdp_offload (when ``host_memory_gib`` per node, if given, holds the
    offloaded state; combinations train refuses, e.g. QLoRA under DeepSpeed parameter offload, are skipped), else
    fsdp with LoRA, then QLoRA, then those with fsdp_offload. With ``embedding_on_host`` (which needs every rank to
    hold the whole model) ddp, else zero2, in place of those. One GPU: single with the requested method, else LoRA,
    else QLoRA.
    """
    world, method = inputs.world_size, inputs.peft_method
    if world == 1:
        strategies: tuple[str, ...] = ("single",)
    else:
        strategies = ("ddp", "zero2") if inputs.embedding_on_host else ("fsdp", "zero3_offload", "fsdp_offload")
    fallback_methods = {"none": ("lora", "qlora"), "dora": ("lora", "qlora")}.get(method, ())
    fallback_methods += ("qlora",) if method in ("lora", "ia3") else ()
    candidates = [(s, method) for s in strategies] + [(strategies[0], m) for m in fallback_methods]
    # the lighter methods offloaded, last (FSDP2 offload also takes QLoRA: trainer/config/feasibility.py)
    if world > 1 and not inputs.embedding_on_host:
        candidates += [("fsdp_offload", m) for m in fallback_methods]

    tried: list[str] = []
    last: tuple[str, str, MemoryEstimate | None] = (strategies[0], method, None)
    for strategy, candidate_method in candidates:
        weights = inputs.weight_precision if candidate_method == method else None
        estimate, error = _try_estimate(inputs, strategy=strategy, peft_method=candidate_method,
                                        weight_precision=weights)
        label = f"{strategy} + {method_label(candidate_method)}"
        if estimate is None:
            tried.append(f"{label}: not possible ({error})")
            continue
        last = (strategy, candidate_method, estimate)
        host = f" and {_gib(estimate.host_total_per_node)} host/node" if estimate.host_total_per_rank else ""
        if estimate.fits(gpu_memory_gib, host_memory_gib):
            chosen = f"{label} needs {_gib(estimate.total)} of {gpu_memory_gib:g} GiB per GPU{host}: chosen"
            reason = f"{world} GPU(s): " + "; ".join([*tried, chosen])
            return AutoChoice(strategy, candidate_method, estimate, True, reason)
        tried.append(f"{label} needs {_gib(estimate.total)}/GPU{host}: does not fit")
    reason = "; ".join(tried) + "; nothing fits: shorten seq_len or micro_batch_size, or add GPUs"
    return AutoChoice(last[0], last[1], last[2], False, f"{world} GPU(s): {reason}")


def _cell_text(cell: FitCell) -> str:
    if cell.estimate is None:
        return "n/a"
    need = "-" if cell.min_gpus is None else str(cell.min_gpus)
    return f"{cell.estimate.total / GIB:7.1f} {'yes' if cell.fits else 'no ':3s} {need:>3s}"


def render_table(table: FitTable, title: str | None = None) -> str:
    """Fixed-width text: one row per strategy, per method "GiB/GPU fits min-GPUs", then notes and the choice.

    ``title`` names the model in the first line (e.g. ``cfg.model.name``); the model type is used otherwise.
    """
    inputs = table.inputs
    methods = list(dict.fromkeys(cell.peft_method for cell in table.cells))
    strategies = list(dict.fromkeys(cell.strategy for cell in table.cells))
    by_key = {(cell.strategy, cell.peft_method): cell for cell in table.cells}
    any_estimate = next((c.estimate for c in table.cells if c.estimate), None)
    lines = []
    if any_estimate is not None:
        params = any_estimate.params
        lines.append(f"{title or params.model_type} ({params.model_type}): {params.total:,} parameters")
        trainables = {c.peft_method: c.estimate.trainable.total for c in table.cells if c.estimate}
        lines.append("trainable: " + ", ".join(f"{method_label(m)} {n:,}" for m, n in trainables.items()))
    lines.append(
        f"seq_len {inputs.seq_len} x micro batch {inputs.micro_batch_size}, {inputs.precision}, {inputs.optimizer}, "
        f"checkpointing {'on' if inputs.gradient_checkpointing else 'off'}, attention {inputs.attention}; "
        f"{table.nodes} node(s) x {table.gpus_per_node} GPU(s) of {table.gpu_memory_gib:g} GiB"
    )
    lines.append("")
    columns = "".join(f"{method_label(m) + ' (GiB/GPU fits minGPUs)':<30}" for m in methods)
    header = f"{'strategy':<14}{columns}".rstrip()
    lines += [header, "-" * len(header)]
    for strategy in strategies:
        row = f"{strategy:<14}" + "".join(f"{_cell_text(by_key[(strategy, m)]):<30}" for m in methods)
        lines.append(row.rstrip())
    offloaded = [c for c in table.cells if c.estimate and c.estimate.host_total_per_rank]
    if offloaded:
        limit = "" if table.host_memory_gib is None else f" (limit {table.host_memory_gib:g} GiB)"
        by_strategy: dict[str, list[str]] = {}
        for c in offloaded:
            by_strategy.setdefault(c.strategy, []).append(
                f"{method_label(c.peft_method)} {_gib(c.estimate.host_total_per_node)}")
        lines.append("host memory per node (offload, input embedding)" + limit + ": " + "; ".join(
            f"{strategy} {', '.join(figures)}" for strategy, figures in by_strategy.items()))
    errors = sorted({f"n/a {c.strategy} + {method_label(c.peft_method)}: {c.error}" for c in table.cells if c.error})
    lines += ["", *errors] if errors else []
    notes = sorted({note for c in table.cells if c.estimate for note in c.estimate.notes})
    lines += ["", *(f"note: {note}" for note in notes)] if notes else []
    choice = table.recommendation
    lines.append("")
    if choice is None:
        lines.append(f"recommendation: none ({table.reason})")
    else:
        lines.append(f"recommendation: {choice.strategy} + {method_label(choice.peft_method)} ({table.reason})")
    return "\n".join(lines)


def render_estimate(estimate: MemoryEstimate) -> str:
    """Fixed-width breakdown of one estimate: GPU components, then host components when offloading."""
    lines = [f"{name:<16}{value / GIB:10.2f} GiB" for name, value in estimate.gpu_breakdown().items()]
    if estimate.host_total_per_rank:
        lines.append("host (offload)" if estimate.inputs.strategy in OFFLOAD_STRATEGIES else "host (input embedding)")
        lines += [f"  {name:<14}{value / GIB:10.2f} GiB" for name, value in estimate.host_breakdown().items()]
    return "\n".join(lines + [f"note: {note}" for note in estimate.notes])


def estimate_to_json(estimate: MemoryEstimate) -> dict:
    return {
        "strategy": estimate.inputs.strategy,
        "peft_method": estimate.inputs.peft_method,
        "world_size": estimate.inputs.world_size,
        "trainable_params": estimate.trainable.total,
        "bytes_per_gpu": estimate.gpu_breakdown(),
        "host_bytes": estimate.host_breakdown(),
        "notes": list(estimate.notes),
    }


def to_json(table: FitTable) -> dict:
    """Machine-readable table: parameter counts, per strategy/method bytes per GPU, fits, min GPUs, choice."""
    estimates = [c.estimate for c in table.cells if c.estimate]
    choice = table.recommendation
    return {
        "model_type": estimates[0].params.model_type if estimates else table.inputs.arch.get("model_type"),
        "total_params": estimates[0].params.total if estimates else None,
        "trainable_params": {c.peft_method: c.estimate.trainable.total for c in table.cells if c.estimate},
        "gpu_memory_gib": table.gpu_memory_gib,
        "nodes": table.nodes,
        "gpus_per_node": table.gpus_per_node,
        "entries": [
            {
                "strategy": c.strategy,
                "peft_method": c.peft_method,
                "bytes_per_gpu": c.bytes_per_gpu,
                "fits": c.fits,
                "min_gpus": c.min_gpus,
                "error": c.error,
                "estimate": estimate_to_json(c.estimate) if c.estimate else None,
            }
            for c in table.cells
        ],
        "recommendation": None if choice is None else {"strategy": choice.strategy, "peft_method": choice.peft_method},
        "reason": table.reason,
    }
