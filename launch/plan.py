"""`trainer plan [OVERRIDES] [--json]`: per-GPU memory of the configured run, and what fits where.

The config is composed exactly as `trainer train` composes it, but nothing it points at has to exist except the
model's architecture: `config.json` in `model.path` when that directory has one (what training would build), else
the `model.arch` fields of a conf/model entry. No weights, no data, no torch: the answer comes in well under a
second, and it is the same code that `trainer/plan/` documents (docs/memory-planning.md).

Where the config says something training would refuse (strategy=single with several processes, a global batch that
does not divide), the plan still answers and says so in a note: choosing the setup is what it is for.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from trainer.errors import ConfigError, UserError

USAGE = """\
usage: trainer plan [my.yaml] [OVERRIDES] [--json] [-cd DIR] [-cn NAME]

Per-GPU memory of the run `trainer train OVERRIDES` would start (weights, gradients, optimizer state, activations,
margin), then every strategy x {full, LoRA, QLoRA} on the configured GPUs: GiB per GPU, whether it fits, the
smallest GPU count that fits, and a recommendation. Reads only the model's architecture (config.json in model.path,
or model.arch of a conf/model entry); no weights or data needed.

  --json     print one JSON object instead of tables (total_params, trainable_params, bytes per GPU per strategy)
  my.yaml    your own config file, composed over the defaults like the overrides (README: your own config file)
  -cd DIR    add DIR to the config search path (your own experiment/, model/ ... options); -cn NAME: primary config

e.g. trainer plan model=llama-3.1-70b hardware.gpu_memory_gb=80 launcher.nproc_per_node=8
     trainer plan experiment=llama-3.1-70b-lora-zero3-2x8 hardware.gpu_memory_gb=80 hardware.host_memory_gb=1024
     trainer plan --json model.path=/models/Llama-3.1-8B peft=none strategy=fsdp train.precision=bf16
"""
DEFAULT_GPU_MEMORY_GIB = 80.0  # when neither hardware.gpu_memory_gb nor a local GPU says otherwise
OPTIMIZER_NAMES = {"paged_adamw_32bit": "paged_adamw"}  # optim.name -> the planner's name, where they differ
# The sections the planner reads; the others (run dir, eval, checkpoints, logging) cannot change memory.
PLAN_SECTIONS = ("model", "data", "peft", "strategy", "optim", "train", "objective", "regularize", "launcher",
                 "hardware")


@dataclass
class PlanRequest:
    """What `trainer plan` derived from the config: planner inputs, the GPUs to fit, and notes for the reader."""

    model_name: str
    arch_source: str
    inputs: Any  # trainer.plan.PlanInputs of the configured run
    nodes: int
    gpus_per_node: int
    gpu_memory_gib: float
    host_memory_gib: float | None
    notes: list[str] = field(default_factory=list)
    rows_per_example: int = 1  # 2 for preference objectives (a pair is two rows)


def compose_sections(overrides: list[str]) -> dict[str, Any]:
    """The typed sections the planner reads, composed as `trainer train OVERRIDES` would compose them.

    Each section runs its schema checks (one-line errors naming the key); the cross-group and file-system checks of
    `trainer train` do not run, because a plan must work for models and data that are not on this machine.
    """
    from launch.compose import compose_train_config
    from trainer.config.defaults import apply_defaults
    from trainer.config.validate import validate_sections

    sections = validate_sections(compose_train_config(overrides), PLAN_SECTIONS)
    if sections["train"].precision == "auto":  # a plan is for GPUs, which train in bf16 unless told otherwise
        sections["train"].precision = "bf16"
    apply_defaults(sections)
    return sections


def read_model_arch(model) -> tuple[dict, str]:
    """The architecture fields, and where they came from. A local config.json wins, as it does in training."""
    from trainer.plan import load_arch

    path = model.path
    if path and (os.path.isfile(os.path.join(path, "config.json")) or path.endswith(".json") and os.path.isfile(path)):
        try:
            return load_arch(path), os.path.join(path, "config.json") if os.path.isdir(path) else path
        except (OSError, ValueError) as err:
            raise ConfigError("model.path", f"cannot read the architecture from {path!r}: {err}") from None
    if model.arch:
        return dict(model.arch), f"model.arch of {model.name}"
    raise ConfigError("model.path", f"{path!r} has no config.json and model.arch is not set: give a local "
                      "checkpoint dir (only its config.json is read) or a conf/model entry, e.g. model=llama-3.1-8b")


def planned_strategy(strategy) -> tuple[str, list[str]]:
    """Our strategy config -> the planner's strategy name, with a note where the planner approximates it."""
    name = strategy.name
    if name in ("single", "ddp"):
        return name, []
    if name == "fsdp":
        if strategy.cpu_offload:
            return "fsdp_offload", []
        return "fsdp", []
    offloaded = [key for key in ("offload_optimizer", "offload_param") if getattr(strategy, key) != "none"]
    if strategy.stage == 3 and len(offloaded) == 2:
        on_nvme = "nvme" in (strategy.offload_optimizer, strategy.offload_param)
        return "zero3_offload", ["nvme offload: what the plan shows as host memory goes to NVMe"] if on_nvme else []
    notes = [f"strategy.{key}={getattr(strategy, key)} alone is not modelled: that state is counted on the GPU "
             "(an upper bound)" for key in offloaded]
    return f"zero{strategy.stage}", notes


def deepspeed_bucket_elements(strategy) -> int:
    """Elements of DeepSpeed's gradient reduce buckets: reduce_bucket_size (default, or strategy.deepspeed_overrides),
    two of them under ZeRO-1/2 with strategy.overlap_comm (stage 3 keeps one)."""
    from trainer.plan.memory import DEEPSPEED_REDUCE_BUCKET_ELEMENTS

    zero = (getattr(strategy, "deepspeed_overrides", None) or {}).get("zero_optimization") or {}
    size = zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET_ELEMENTS)
    try:
        elements = int(float(size))
    except (TypeError, ValueError):
        elements = 0
    if elements <= 0 or isinstance(size, bool):
        raise ConfigError("strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size",
                          f"must be a positive number of elements (DeepSpeed's default: 5e8), got {size!r}")
    size = elements
    double = getattr(strategy, "overlap_comm", False) and getattr(strategy, "stage", 3) in (1, 2)
    return size * (2 if double else 1)


def peft_fields(peft, params) -> dict[str, Any]:
    """PEFT config -> PlanInputs fields, read by name so that every PEFT option maps the same way."""
    fields: dict[str, Any] = {"peft_method": peft.name}
    if getattr(peft, "r", None) is not None:
        fields["lora_r"] = peft.r
    if getattr(peft, "dropout", None) is not None:
        fields["lora_dropout"] = peft.dropout
    targets = getattr(peft, "target_modules", None)
    if targets is not None:
        fields["target_modules"] = planner_targets(targets, params)
    if getattr(peft, "experts", False):
        fields["lora_experts"] = True
    if getattr(peft, "num_virtual_tokens", None) is not None:
        fields["num_virtual_tokens"] = peft.num_virtual_tokens
    if getattr(peft, "quant_type", None) is not None:  # qlora: nf4 | fp4
        fields["weight_precision"] = peft.quant_type
    if getattr(peft, "double_quant", None) is not None:
        fields["double_quant"] = peft.double_quant
    if getattr(peft, "quantize_lm_head", False):
        fields["quantize_lm_head"] = True
    return fields


def planner_targets(targets, params) -> str | tuple[str, ...]:
    """peft.target_modules as the planner names them. The presets `attention` and `mlp` pick the nn.Linear modules
    of a decoder layer's attention or feed-forward block, as trainer/adapters.py resolves them (MoE experts are 3-D
    parameters, not nn.Linear, so `mlp` gives Mixtral's router only)."""
    if not isinstance(targets, str):
        return tuple(targets)
    roles = {"attention": ("attention",), "mlp": ("mlp", "router")}.get(targets)
    if roles is None:  # all-linear: the nn.Linear layers, as trainer/adapters.py resolves it (no MoE experts/router)
        return tuple(m.name for m in params.linear_modules if m.copies == 1 and m.role != "router")
    return tuple(m.name for m in params.linear_modules if m.role in roles and m.copies == 1)


def resolve_auto(sections: dict[str, Any], world: int, gpu_memory_gib: float, notes: list[str]) -> dict[str, Any]:
    """strategy=auto as `trainer train` would resolve it on `world` GPUs of `gpu_memory_gib` (the same decision,
    launch/auto_strategy.py's `choose`): the sections with the chosen strategy, PEFT method, precision and
    checkpointing, and a note saying so. When nothing fits, the least-bad choice is planned and the note says so."""
    from launch.auto_strategy import Devices, choose, peft_config_for, strategy_config_for

    config = SimpleNamespace(**sections)
    try:
        choice, settings = choose(config, Devices(world, gpu_memory_gib, "plan"))
    except ConfigError as err:  # allow_peft_fallback=false and the requested method does not fit
        notes.append(f"strategy={err.message}")
        return {**sections, "strategy": strategy_config_for("fsdp" if world > 1 else "single")}
    precision = settings["precision"]
    train = dataclasses.replace(sections["train"], precision=precision,
                                gradient_checkpointing=settings["gradient_checkpointing"])
    peft = peft_config_for(sections["peft"], choice.peft_method, choice.strategy, precision)
    outcome = "what `trainer train` would run" if choice.fits else "nothing fits; the nearest miss is planned"
    notes.append(f"strategy=auto -> {choice.strategy} + peft={peft.name}, train.precision={precision}, gradient "
                 f"checkpointing {'on' if settings['gradient_checkpointing'] else 'off'} ({outcome}): {choice.reason}")
    return {**sections, "strategy": strategy_config_for(choice.strategy), "peft": peft, "train": train}


def build_request(sections: dict[str, Any]) -> PlanRequest:
    """Map the composed config onto the planner's inputs (trainer.plan.PlanInputs) and the GPUs to fit."""
    from trainer.plan import PlanInputs, count_parameters

    launcher, hardware = sections["launcher"], sections["hardware"]
    nodes = int(getattr(launcher, "nnodes", None) or getattr(launcher, "nodes", None) or 1)
    gpus_per_node = int(getattr(launcher, "nproc_per_node", None) or getattr(launcher, "gpus_per_node", None) or 1)
    world = nodes * gpus_per_node
    notes: list[str] = []
    gpu_memory = hardware.gpu_memory_gb
    if gpu_memory is None:
        from trainer.hardware import local_gpu_memory_gib

        gpu_memory = local_gpu_memory_gib()
        if gpu_memory is None:
            gpu_memory = DEFAULT_GPU_MEMORY_GIB
            notes.append(f"hardware.gpu_memory_gb is not set and no GPU is visible: planned for "
                         f"{DEFAULT_GPU_MEMORY_GIB:g} GiB GPUs")
        else:
            notes.append(f"hardware.gpu_memory_gb is not set: planned for this machine's GPUs ({gpu_memory:.1f} GiB)")
    if sections["train"].embedding_on_host:
        from trainer.config.validate import check_embedding_on_host

        # The method, the model and peft.modules_to_save, as `trainer train` checks them (strategy "auto": each
        # strategy is the planner's to refuse, cell by cell), so that auto never trades the method away for it.
        check_embedding_on_host(SimpleNamespace(**sections), "auto")
    if sections["strategy"].name == "auto":
        sections = resolve_auto(sections, world, float(gpu_memory), notes)
    model, train = sections["model"], sections["train"]
    arch, source = read_model_arch(model)
    strategy, strategy_notes = planned_strategy(sections["strategy"])
    notes.extend(strategy_notes)
    if strategy == "single" and world > 1:
        notes.append(f"strategy=single runs one process, so `trainer train` refuses {world} launcher processes; "
                     "the configured run is planned on 1 GPU and the table shows the strategies that use all of them")
    if train.global_batch_size % (train.micro_batch_size * world):
        notes.append(f"train.global_batch_size {train.global_batch_size} is not a multiple of micro_batch_size x "
                     f"world size ({train.micro_batch_size} x {world}); `trainer train` will ask you to change it")

    single_gpu = strategy == "single"
    rows_per_example = 1
    if sections["objective"].name != "sft":
        # A micro batch of m pairs is 2m rows (chosen and rejected, one forward); the reference model costs no GPU
        # memory: its log-probs are computed once before training (trainer/objectives/reference.py).
        rows_per_example = 2
        name = sections["objective"].name
        unit = "answer(s), each beside a mismatched one for the KL estimate," if name == "kto" else "pair(s)"
        notes.append(f"objective={name}: a micro batch of {train.micro_batch_size} {unit} is "
                     f"{2 * train.micro_batch_size} rows, planned as such; no reference model is held (its "
                     "log-probs are computed once, in one pass, before step 1)")
    try:
        params = count_parameters(arch)  # a missing or malformed size field is named before anything else
        inputs = PlanInputs(
            arch,
            **peft_fields(sections["peft"], params),
            precision=train.precision,
            optimizer=OPTIMIZER_NAMES.get(sections["optim"].name, sections["optim"].name),
            strategy=strategy,
            nodes=1 if single_gpu else nodes,
            gpus_per_node=1 if single_gpu else gpus_per_node,
            micro_batch_size=train.micro_batch_size * rows_per_example,
            seq_len=sections["data"].max_seq_len,
            gradient_checkpointing=train.gradient_checkpointing,
            activation_offloading=train.activation_offloading,
            embedding_on_host=train.embedding_on_host,
            attention=model.attn_implementation,
            loss_chunk_tokens=sections["objective"].chunk_tokens,
            anchor_copies=sections["regularize"].anchor_copies,
            deepspeed_bucket_elements=deepspeed_bucket_elements(sections["strategy"]),
        )
    except ValueError as err:
        raise planner_error_to_config_error(err, source) from None
    return PlanRequest(model.name, source, inputs, nodes, gpus_per_node, float(gpu_memory),
                       hardware.host_memory_gb, notes, rows_per_example)


def plan(request: PlanRequest):
    """(estimate of the configured run, the what-fits table). A configured run the planner refuses (e.g. target
    modules that match nothing in this architecture) is a config error; other table entries that cannot run are
    shown as n/a with the reason."""
    from trainer.plan import estimate_memory, what_fits

    try:
        estimate = estimate_memory(request.inputs)
    except ValueError as err:
        raise planner_error_to_config_error(err, request.arch_source) from None
    table = what_fits(request.inputs, request.gpu_memory_gib, request.nodes, request.gpus_per_node,
                      host_memory_gib=request.host_memory_gib)
    return estimate, table


# The PlanInputs field a planner message starts with -> the config key a user changes.
_CONFIG_KEY_OF_FIELD = {
    "peft_method": "peft", "lora_r": "peft.r", "lora_dropout": "peft.dropout", "target_modules": "peft.target_modules",
    "num_virtual_tokens": "peft.num_virtual_tokens", "weight_precision": "peft.quant_type",
    "precision": "train.precision", "optimizer": "optim.name",
    "attention": "model.attn_implementation", "micro_batch_size": "train.micro_batch_size",
    "seq_len": "data.max_seq_len", "nodes": "launcher.nnodes", "gpus_per_node": "launcher.nproc_per_node",
}


def planner_error_to_config_error(err: ValueError, arch_source: str) -> ConfigError:
    """The planner's ValueError (which names its input) as a one-line config error naming the config key."""
    message = str(err)
    first_word = message.split(" ", 1)[0]
    if first_word.startswith("arch."):
        where = "model.arch" if arch_source.startswith("model.arch") else "model.path"
        return ConfigError(where, f"{message} (read from {arch_source})")
    if first_word.endswith(":") and "." in first_word:  # a feasibility refusal names its config key itself
        return ConfigError(first_word[:-1], message.split(" ", 1)[1])
    key = _CONFIG_KEY_OF_FIELD.get(first_word.split("=", 1)[0], "peft")
    return ConfigError(key, message)


def render_text(request: PlanRequest, estimate, table) -> str:
    """The configured run's per-GPU breakdown, then the strategies x methods table with its recommendation."""
    from trainer.plan import GIB, render_estimate, render_table
    from trainer.plan.table import method_label

    inputs = request.inputs
    share = 100 * estimate.trainable.total / max(estimate.params.total, 1)
    fits = estimate.fits(request.gpu_memory_gib, request.host_memory_gib)
    lines = [
        f"model: {request.model_name} (architecture from {request.arch_source})",
        f"configured run: {inputs.strategy} + {method_label(inputs.peft_method)} on {inputs.nodes} node(s) x "
        f"{inputs.gpus_per_node} GPU(s) of {request.gpu_memory_gib:g} GiB",
        f"trainable {estimate.trainable.total:,} of {estimate.params.total:,} parameters ({share:.2f}%); per GPU:",
        *(f"  {line}" for line in render_estimate(estimate).splitlines()),
        f"  -> {estimate.total / GIB:.1f} of {request.gpu_memory_gib:g} GiB per GPU: "
        f"{'fits' if fits else 'does NOT fit'}",
        *([] if fits else _knob_lines(request)),
        *(f"note: {note}" for note in request.notes),
        "",
        f"what fits on {table.nodes} node(s) x {table.gpus_per_node} GPU(s):",
        render_table(table, title=request.model_name),
    ]
    return "\n".join(lines)


def _knobs(request: PlanRequest):
    from trainer.plan.knobs import cheap_knobs

    return cheap_knobs(request.inputs, request.gpu_memory_gib, request.host_memory_gib, request.rows_per_example)


def _knob_lines(request: PlanRequest) -> list[str]:
    """The cheap knobs, each with its figure, before the table's answers that need other GPUs or another method."""
    from trainer.plan import GIB

    knobs = _knobs(request)
    if not knobs:
        return []
    lines = ["  cheap knobs first (GiB per GPU with each; the table below tries other strategies and methods):"]
    for knob in knobs:
        verdict = "fits" if knob.fits else "does not fit"
        caveat = " (truncates longer samples)" if knob.changes_the_job else ""
        lines.append(f"    {' '.join(knob.overrides)}: {knob.total / GIB:.1f} GiB, {verdict}{caveat}")
    return lines


def render_json(request: PlanRequest, estimate, table) -> dict:
    """trainer.plan.to_json's table, plus the configured run and a strategy -> method -> bytes-per-GPU map."""
    from trainer.plan import estimate_to_json, to_json
    from trainer.plan.table import method_label

    report = to_json(table)
    per_strategy: dict[str, dict[str, int | None]] = {}
    for entry in report["entries"]:
        per_strategy.setdefault(entry["strategy"], {})[method_label(entry["peft_method"])] = entry["bytes_per_gpu"]
    configured = {**estimate_to_json(estimate), "fits": estimate.fits(request.gpu_memory_gib, request.host_memory_gib)}
    if not configured["fits"]:
        configured["cheap_knobs"] = [{"overrides": list(knob.overrides), "bytes_per_gpu": knob.total, "fits": knob.fits,
                                      "changes_the_job": knob.changes_the_job} for knob in _knobs(request)]
    return {"model": request.model_name, "arch_source": request.arch_source, **report,
            "host_memory_gib": request.host_memory_gib, "configured": configured,
            "bytes_per_gpu_by_strategy": per_strategy, "notes": request.notes}


def main(argv: list[str]) -> int:
    if any(arg in ("-h", "--help") for arg in argv):
        sys.stdout.write(USAGE)
        return 0
    as_json = "--json" in argv
    from launch.config_file import split_config_location

    overrides = [arg for arg in argv if arg != "--json"]
    unknown = [arg for arg in split_config_location(overrides)[0] if arg.startswith("-")]
    if unknown:
        raise UserError(f"plan: unknown option {unknown[0]!r} (options: --json, --config-dir/-cd DIR, "
                        "--config-name/-cn NAME, --help; the rest are config overrides or a config file)")
    request = build_request(compose_sections(overrides))
    estimate, table = plan(request)
    if as_json:
        sys.stdout.write(json.dumps(render_json(request, estimate, table), indent=2) + "\n")
    else:
        sys.stdout.write(render_text(request, estimate, table) + "\n")
    return 0
