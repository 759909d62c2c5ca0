"""PEFT, optimizer and freezing options: schema checks, and the combinations validation refuses before launch."""

from __future__ import annotations

import pytest

from tests.conftest import assert_one_line_error, compose_config, run_cli
from trainer.errors import ConfigError

MULTI = ("launcher.nproc_per_node=2", "train.micro_batch_size=4", "train.global_batch_size=8")


def _compose(tmp_path, *overrides):
    return compose_config(f"run.dir={tmp_path}", *overrides)


@pytest.mark.parametrize("method", ["lora", "dora", "qlora", "ia3", "prompt_tuning", "prefix_tuning"])
def test_each_method_composes_with_its_defaults(tmp_path, method):
    config = _compose(tmp_path, f"peft={method}")
    assert config.peft.name == method


def test_qlora_options(tmp_path):
    peft = _compose(tmp_path, "peft=qlora", "peft.quant_type=fp4", "peft.double_quant=false",
                    "peft.compute_dtype=bf16", "peft.quant_storage=bf16", "peft.use_rslora=true").peft
    assert (peft.quant_type, peft.double_quant, peft.compute_dtype, peft.quant_storage, peft.use_rslora) == (
        "fp4", False, "bf16", "bf16", True)


@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    (("peft.target_modules=everything",), "peft.target_modules", "attention"),
    (("peft=qlora", "peft.quant_type=int3"), "peft.quant_type", "nf4"),
    (("peft=qlora", "peft.quant_storage=int8"), "peft.quant_storage", "bf16"),
    (("peft=prompt_tuning", "peft.init=text"), "peft.init_text", "required"),
    (("optim.name=sgd",), "optim.name", "paged_adamw_8bit"),
    (("optim.layer_lr_decay=0",), "optim.layer_lr_decay", "(0, 1]"),
    (("optim.freeze.patterns=['layers.(0']",), "optim.freeze.patterns.0", "regular expression"),
])
def test_bad_option_names_its_key(tmp_path, overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        _compose(tmp_path, *overrides)
    assert info.value.key == key and fragment in str(info.value)


@pytest.mark.parametrize(("overrides", "key", "fragment"), [
    (("peft=qlora", "strategy=fsdp", "train.precision=bf16", *MULTI), "peft.quant_storage", "quant_storage=bf16"),
    (("peft=qlora", "strategy=zero3", "train.precision=bf16", *MULTI), "peft.quant_storage", "quant_storage=bf16"),
    (("peft=qlora", "peft.quant_storage=bf16", "strategy=zero3_offload", "train.precision=bf16", *MULTI),
     "strategy.offload_param", "quantisation state"),
    (("peft=qlora", "model=llama-2-7b", "model.path=null", "model.init=random"), "peft", "pretrained"),
    (("optim=adamw_8bit", "strategy=fsdp", *MULTI), "optim.name", "DTensor"),
    (("optim=paged_adamw_8bit", "strategy=zero2", *MULTI), "optim.name", "zero_allow_untested_optimizer"),
    (("optim=paged_adamw_32bit", "strategy=zero3_offload", *MULTI), "optim.name", "CPU Adam"),
    (("optim.layer_lr_decay=0.9", "strategy=zero3_offload", *MULTI), "optim.layer_lr_decay", "CPU Adam"),
    (("optim.freeze.unfreeze_every_n_steps=5", "strategy=ddp", *MULTI), "optim.freeze.unfreeze_every_n_steps",
     "strategy=single"),
    (("peft=prompt_tuning", "model.attn_implementation=flash_attention_2"), "data.packing", "sdpa"),
])
def test_combinations_that_cannot_work_are_refused_with_the_reason(tmp_path, overrides, key, fragment):
    with pytest.raises(ConfigError) as info:
        _compose(tmp_path, *overrides)
    assert info.value.key == key and fragment in str(info.value), str(info.value)


@pytest.mark.parametrize("overrides", [
    ("peft=qlora", "peft.quant_storage=bf16", "strategy=fsdp", "train.precision=bf16", *MULTI),
    ("peft=qlora", "peft.quant_storage=bf16", "strategy=zero3", "train.precision=bf16", *MULTI),
    # FSDP2 offloads the 4-bit shards (the 70B-on-2x24GB recipe); tests/integration/test_peft_strategies.py trains it
    ("peft=qlora", "peft.quant_storage=bf16", "strategy=fsdp", "strategy.cpu_offload=true", "train.precision=bf16",
     *MULTI),
    ("peft=qlora", "strategy=ddp", *MULTI),
    ("peft=qlora", "peft.quant_storage=bf16", "strategy=zero3", "strategy.offload_optimizer=cpu",
     "train.precision=bf16", *MULTI),
    ("optim=paged_adamw_8bit", "strategy=zero2", "+strategy.deepspeed_overrides.zero_allow_untested_optimizer=true",
     *MULTI),
    ("peft=prompt_tuning", "data.packing=true"),
    ("peft=qlora", "train.precision=fp16"),
])
def test_combinations_that_work_pass(tmp_path, overrides):
    assert _compose(tmp_path, *overrides).peft is not None


def test_refusal_is_one_line_before_anything_heavy(tmp_path):
    result = run_cli("train", f"run.dir={tmp_path}", "peft=qlora", "strategy=fsdp", "train.precision=bf16", *MULTI,
                     timeout=120)
    assert_one_line_error(result, "peft.quant_storage", "set peft.quant_storage=bf16")
