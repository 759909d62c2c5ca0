"""Whatever `trainer plan` recommends and `strategy=auto` chooses, `trainer train` accepts: one feasibility rule
(trainer/config/feasibility.py) for all three, checked over a grid of every real architecture the project ships
(conf/model) x {full, LoRA, QLoRA} x GPU memory {16, 24, 40, 80} GiB x GPU count {1, 2, 8, 16}."""

from __future__ import annotations

import dataclasses
import json

import pytest
import yaml

from launch.auto_strategy import Devices, peft_config_for, planner_inputs, resolve_auto_strategy, strategy_config_for
from tests.conftest import REPO, compose_config
from trainer.config.validate import check_cross_group, check_peft_optim_strategy
from trainer.errors import ConfigError

ENTRIES = sorted(path.stem for path in (REPO / "conf" / "model").glob("*.yaml") if path.stem != "tiny-llama")
METHODS = ("none", "lora", "qlora")
GIB = (16, 24, 40, 80)
GPUS = (1, 2, 8, 16)


@pytest.fixture(scope="module")
def configs(tmp_path_factory):
    """One validated config per architecture x method (the grid varies only the GPUs on top of it)."""
    root = tmp_path_factory.mktemp("grid")
    composed = {}
    for entry in ENTRIES:
        arch = yaml.safe_load((REPO / "conf" / "model" / f"{entry}.yaml").read_text())["arch"]
        model_dir = root / entry
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(arch))
        for method in METHODS:
            composed[entry, method] = compose_config(
                f"model={entry}", f"model.path={model_dir}", "strategy=auto", f"peft={method}",
                "train.micro_batch_size=1", "train.global_batch_size=16", "data.max_seq_len=2048",
                f"run.dir={root / 'runs' / entry / method}")
    return composed


def _as_trained(config, strategy: str, method: str, gpus: int):
    """CONFIG with the planner's STRATEGY + METHOD on GPUS processes, as a user would write it."""
    precision = "bf16" if method != config.peft.name and config.train.precision == "fp32" else config.train.precision
    launcher = dataclasses.replace(config.launcher, nproc_per_node=gpus)
    return dataclasses.replace(config, strategy=strategy_config_for(strategy),
                               peft=peft_config_for(config.peft, method, strategy, precision),
                               train=dataclasses.replace(config.train, precision=precision), launcher=launcher)


@pytest.mark.parametrize(("method", "embedding_on_host"), [(m, False) for m in METHODS] + [("lora", True),
                                                                                          ("qlora", True)])
def test_auto_and_plan_recommend_only_what_train_accepts(configs, method, embedding_on_host):
    """With train.embedding_on_host too: auto keeps to the strategies that hold the whole model on each rank, and
    refuses a tied model (Gemma) before choosing anything."""
    from trainer.plan import what_fits

    checked = {"auto": 0, "plan": 0, "nothing fits": 0, "refused": 0}
    for entry in ENTRIES:
        config = configs[entry, method]
        if embedding_on_host:
            config = dataclasses.replace(config, train=dataclasses.replace(config.train, embedding_on_host=True))
        for gib in GIB:
            for gpus in GPUS:
                where = f"{entry} peft={method} {gpus} x {gib} GiB"
                try:
                    check_peft_optim_strategy(config)  # as `trainer train` validates before auto resolves
                    resolved = resolve_auto_strategy(config, Devices(gpus, gib, "grid"), say=lambda line: None)
                except ConfigError as err:  # auto may find nothing that fits; it must never pick a refused setup
                    if embedding_on_host and err.key == "train.embedding_on_host":
                        assert "tie_word_embeddings" in str(err) and entry.startswith("gemma"), (where, str(err))
                        checked["refused"] += 1
                        continue
                    assert "strategy: auto: nothing fits" in str(err), (where, str(err))
                    checked["nothing fits"] += 1
                else:
                    check_peft_optim_strategy(resolved)
                    checked["auto"] += 1

                per_node = min(gpus, 8)
                inputs, _ = planner_inputs(config, strategy="single" if gpus == 1 else "fsdp", world=per_node)
                table = what_fits(inputs, gib, nodes=gpus // per_node, gpus_per_node=per_node)
                cell = table.recommendation
                if cell is None or not cell.fits:
                    continue
                recommended = _as_trained(config, cell.strategy, cell.peft_method, gpus)
                try:
                    check_peft_optim_strategy(recommended)
                    check_cross_group(recommended)
                except ConfigError as err:
                    pytest.fail(f"{where}: plan recommends {cell.strategy} + {cell.peft_method}, train refuses: {err}")
                checked["plan"] += 1
    assert checked["auto"] > 0 and checked["plan"] > 0, checked


def test_qlora_that_fits_only_offloaded_is_planned_and_chosen_as_fsdp_offload(configs, tmp_path):
    """Llama-2-70B QLoRA on 2 x 24 GB (the Answer.AI / PEFT recipe): DeepSpeed cannot offload 4-bit weights, FSDP2
    can; plan, auto and train agree on it."""
    from trainer.plan import choose_auto_strategy

    config = compose_config("model=llama-2-70b", "strategy=auto", "peft=qlora", "train.precision=bf16",
                            "train.gradient_checkpointing=true", "train.micro_batch_size=1",
                            "train.global_batch_size=16", "data.max_seq_len=2048",
                            f"model.path={configs['llama-2-70b', 'qlora'].model.path}",
                            f"run.dir={tmp_path / 'run'}")
    inputs, _ = planner_inputs(config, world=2)
    choice = choose_auto_strategy(inputs, 24.0)
    assert choice.fits and (choice.strategy, choice.peft_method) == ("fsdp_offload", "qlora"), choice.reason
    assert "zero3_offload + qlora: not possible (strategy.offload_param: QLoRA with DeepSpeed parameter offload" \
        in choice.reason
    assert choice.estimate.total <= 20 * 1024**3
    resolved = resolve_auto_strategy(config, Devices(2, 24.0, "grid"), say=lambda line: None)
    assert (resolved.strategy.name, resolved.strategy.cpu_offload, resolved.peft.quant_storage) == ("fsdp", True,
                                                                                                  "bf16")


def test_deepspeed_parameter_offload_refuses_qlora_in_train_and_plan(configs):
    from trainer.plan import estimate_memory

    config = configs["llama-3.1-8b", "qlora"]
    refused = _as_trained(config, "zero3_offload", "qlora", 2)
    with pytest.raises(ConfigError, match=r"strategy.offload_param: QLoRA with DeepSpeed parameter offload"):
        check_peft_optim_strategy(refused)
    inputs, _ = planner_inputs(config, strategy="zero3_offload", world=2)
    with pytest.raises(ValueError, match="QLoRA with DeepSpeed parameter offload"):
        estimate_memory(inputs)
