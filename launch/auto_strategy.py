"""`strategy=auto`: pick a concrete strategy (and, if needed, a lighter PEFT method) before launch.

`trainer train` calls `resolve_auto_strategy` between validation and freezing, so the frozen config holds the
concrete choice and every worker runs it as if the user had written it; `<run_dir>/auto_strategy.json` keeps the
numbers behind it. The decision is trainer/plan's `choose_auto_strategy` (the planner behind `trainer plan`) on:

* the model's architecture: config.json in model.path, else a conf/model entry's model.arch;
* the GPUs: their count (launcher.nnodes x nproc_per_node when that is more than one, else the local CUDA devices)
  and memory per GPU (hardware.gpu_memory_gb when set, which also lets a CPU machine plan for GPUs it does not
  have; else the smallest local GPU). With neither, the run stays as configured on one CPU process.

torch is imported only here, and only when strategy=auto: other configs never pay for it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

from trainer.errors import ConfigError

AUTO_RECORD = "auto_strategy.json"
_GATHER_DTYPE = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


@dataclass(frozen=True)
class Devices:
    """What the choice is made for: `count` GPUs of `memory_gib` each (None: no GPU and none simulated)."""

    count: int
    memory_gib: float | None
    source: str  # where the numbers came from, for the log


def detect_devices(config) -> Devices:
    """The GPUs this run will use: hardware.gpu_memory_gb (simulated or stated) wins over the local devices."""
    launcher_world = int(getattr(config.launcher, "world_size", 1) or 1)
    stated = getattr(getattr(config, "hardware", None), "gpu_memory_gb", None)
    if config.launcher.name != "local":  # a scheduler's nodes: their GPUs are not the ones visible here
        if getattr(config.launcher, "gpus_per_node", 0) and stated is None:
            raise ConfigError("hardware.gpu_memory_gb", f"strategy=auto with launcher={config.launcher.name} needs "
                              "the compute nodes' GPU memory (GiB per GPU): they are not visible from here")
        memory = float(stated) if stated is not None else None
        return Devices(launcher_world, memory, f"launcher={config.launcher.name}")
    import torch

    local = torch.cuda.device_count() if torch.cuda.is_available() else 0
    use_all = getattr(config.strategy, "use_all_gpus", True)
    count = launcher_world if launcher_world > 1 else (local if use_all and local > 1 else 1)
    if stated is not None:
        return Devices(count, float(stated), "hardware.gpu_memory_gb")
    if local:
        smallest = min(torch.cuda.get_device_properties(i).total_memory for i in range(local))
        return Devices(count, smallest / 1024**3, f"{local} local GPU(s)")
    return Devices(launcher_world, None, "no GPU visible and hardware.gpu_memory_gb unset")


def planner_inputs(config, strategy: str = "auto", precision: str | None = None, world: int = 1):
    """The configured run as trainer.plan.PlanInputs (the same mapping `trainer plan` uses)."""
    from launch.plan import OPTIMIZER_NAMES, peft_fields, planner_error_to_config_error, read_model_arch
    from trainer.plan import PlanInputs, count_parameters

    arch, source = read_model_arch(config.model)
    rows = config.train.micro_batch_size * (1 if config.objective.name == "sft" else 2)  # pairs: two rows each
    try:
        fields = peft_fields(config.peft, count_parameters(arch))
        return PlanInputs(arch, **fields, precision=precision or config.train.precision,
                          optimizer=OPTIMIZER_NAMES.get(config.optim.name, config.optim.name), strategy=strategy,
                          gpus_per_node=world, micro_batch_size=rows,
                          seq_len=config.data.max_seq_len, gradient_checkpointing=config.train.gradient_checkpointing,
                          activation_offloading=config.train.activation_offloading,
                          embedding_on_host=config.train.embedding_on_host,
                          attention=config.model.attn_implementation,
                          loss_chunk_tokens=config.objective.chunk_tokens,
                          anchor_copies=config.regularize.anchor_copies), source
    except ValueError as err:
        raise planner_error_to_config_error(err, source) from None


def choose(config, devices: Devices):
    """(AutoChoice, settings) for `devices`: the first of these that fits, each decided by trainer/plan's
    choose_auto_strategy (which itself tries the strategies, then LoRA, then QLoRA):

    1. the requested method as configured;  2. the requested method with activation checkpointing;
    3. the fallback methods, with checkpointing if it was needed, in bf16 when the run was fp32 (a frozen base in
       fp32 would waste the memory the fallback is there to save); the method nearest the requested one wins, so
       LoRA with checkpointing is preferred over QLoRA without.

    `settings` holds the train.precision and train.gradient_checkpointing the choice was planned with."""
    from trainer.plan import choose_auto_strategy

    inputs, _ = planner_inputs(config, world=devices.count)
    host = getattr(getattr(config, "hardware", None), "host_memory_gb", None)
    train = config.train
    variants = [{"precision": train.precision, "gradient_checkpointing": train.gradient_checkpointing}]
    if not train.gradient_checkpointing:
        variants.append({"precision": train.precision, "gradient_checkpointing": True})
    choice = None
    for variant in variants:
        choice = choose_auto_strategy(inputs.replace(**variant), devices.memory_gib, host)
        if choice.fits and choice.peft_method == inputs.peft_method:
            return choice, variant
    if not config.strategy.allow_peft_fallback:
        raise ConfigError("strategy", f"auto: peft={config.peft.name} does not fit {devices.count} GPU(s) of "
                          f"{devices.memory_gib:g} GiB and strategy.allow_peft_fallback=false ({choice.reason})")
    lighter = [{**v, "precision": "bf16" if v["precision"] == "fp32" else v["precision"]} for v in variants]
    fitting = []
    for variant in lighter:
        choice = choose_auto_strategy(inputs.replace(**variant), devices.memory_gib, host)
        if choice.fits:
            fitting.append((choice, variant))
    if not fitting:
        return choice, lighter[-1]
    # A method closer to the requested one wins over leaving checkpointing off: LoRA on a bf16 base with
    # checkpointing trains the same weights QLoRA would, without the 4-bit base's quantization error.
    closeness = {method: rank for rank, method in enumerate((inputs.peft_method, "lora", "qlora"))}
    return min(fitting, key=lambda found: closeness.get(found[0].peft_method, len(closeness)))


def strategy_config_for(name: str):
    from trainer.config import schema

    if name == "single":
        return schema.SingleStrategyConfig()
    if name == "ddp":  # auto picks it with train.embedding_on_host (trainer/plan/table.py)
        return schema.DDPStrategyConfig()
    if name in ("fsdp", "fsdp_offload"):
        return schema.FSDPStrategyConfig(cpu_offload=name == "fsdp_offload")
    if name == "zero3_offload":
        return schema.DeepSpeedStrategyConfig(name="zero3_offload", stage=3, offload_optimizer="cpu",
                                              offload_param="cpu")
    return schema.DeepSpeedStrategyConfig(name=name, stage=int(name[-1]))


def peft_config_for(current, method: str, strategy: str, precision: str):
    """The PEFT section for the chosen method: the configured one when it stays, else the new method's defaults
    carrying over LoRA's rank, alpha, dropout and targets. QLoRA on a sharding strategy stores its 4-bit weights in
    the dtype that strategy gathers in."""
    from trainer.config import schema

    peft = current
    if method != current.name:
        carried = {k: getattr(current, k) for k in ("r", "alpha", "dropout", "target_modules", "use_rslora",
                                                       "modules_to_save") if hasattr(current, k)}
        peft = schema.GROUP_OPTIONS["peft"][method](**carried)
    if method == "qlora" and strategy in ("fsdp", "fsdp_offload", "zero3"):
        peft = dataclasses.replace(peft, quant_storage=_GATHER_DTYPE[precision])
    return peft


def resolve_auto_strategy(config, devices: Devices | None = None, say: Callable[[str], Any] | None = None):
    """`config` itself unless strategy=auto; else a copy with a concrete strategy (peft, precision and the launcher's
    process count adjusted as chosen), re-validated. `devices` defaults to `detect_devices(config)`."""
    if config.strategy.name != "auto":
        return config
    from trainer.config.validate import check_cross_group

    say = say or (lambda line: sys.stderr.write(f"[trainer] {line}\n"))
    devices = devices or detect_devices(config)
    if devices.memory_gib is None:
        strategy = "fsdp" if devices.count > 1 else "single"
        precision, checkpointing = config.train.precision, config.train.gradient_checkpointing
        peft = peft_config_for(config.peft, config.peft.name, strategy, precision)
        record: dict[str, Any] = {"strategy": strategy, "peft": peft.name, "fits": None,
                                  "reason": f"{devices.source}: {strategy} on {devices.count} CPU process(es), "
                                            "nothing to plan memory for"}
    else:
        choice, settings = choose(config, devices)
        precision, checkpointing = settings["precision"], settings["gradient_checkpointing"]
        if not choice.fits:
            raise ConfigError("strategy", f"auto: nothing fits {devices.count} GPU(s) of {devices.memory_gib:g} GiB "
                              f"({devices.source}): {choice.reason}")
        strategy, peft = choice.strategy, peft_config_for(config.peft, choice.peft_method, choice.strategy, precision)
        record = {"strategy": strategy, "peft": peft.name, "fits": True, "reason": choice.reason,
                  "bytes_per_gpu": choice.estimate.gpu_breakdown(), "host_bytes": choice.estimate.host_breakdown(),
                  "trainable_params": choice.estimate.trainable.total, "total_params": choice.estimate.params.total}
    launcher = config.launcher
    if strategy != "single" and getattr(launcher, "world_size", 1) < devices.count and hasattr(launcher,
                                                                                             "nproc_per_node"):
        launcher = dataclasses.replace(launcher, nproc_per_node=devices.count)
    train = dataclasses.replace(config.train, precision=precision, gradient_checkpointing=checkpointing)
    resolved = dataclasses.replace(config, strategy=strategy_config_for(strategy), peft=peft, train=train,
                                   launcher=launcher)
    record.update(devices=dataclasses.asdict(devices), precision=precision, gradient_checkpointing=checkpointing,
                  processes=getattr(launcher, "world_size", 1), requested_peft=config.peft.name)
    say(f"strategy=auto -> {strategy} + peft={peft.name}, train.precision={precision}, gradient checkpointing "
        f"{'on' if checkpointing else 'off'}, "
        f"{record['processes']} process(es): {record['reason']}")
    check_cross_group(resolved)
    os.makedirs(resolved.run.dir, exist_ok=True)
    with open(os.path.join(resolved.run.dir, AUTO_RECORD), "w") as fh:
        json.dump(record, fh, indent=2)
    return resolved
