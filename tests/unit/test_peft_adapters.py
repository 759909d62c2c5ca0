"""PEFT on the embedded tiny model, in-process: target presets, the parameter report, prompt learning on packed
rows, freezing, layer-wise LR decay, gradual unfreezing and the bitsandbytes optimizers."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from trainer.config import schema  # noqa: E402
from trainer.errors import ConfigError  # noqa: E402

TINY = str(Path(__file__).resolve().parents[2] / "trainer" / "assets" / "tiny-llama")


def _build(peft_cfg, freeze=None, attn="sdpa"):
    from trainer.model import build_model

    return build_model(schema.ModelConfig(path=TINY, attn_implementation=attn), peft_cfg, "fp32", freeze=freeze)


def _targeted(model) -> set[str]:
    return {name.split(".")[-1] for name, module in model.named_modules() if hasattr(module, "lora_A")}


@pytest.mark.parametrize(("preset", "expected"), [
    ("attention", {"q_proj", "k_proj", "v_proj", "o_proj"}),
    ("mlp", {"gate_proj", "up_proj", "down_proj"}),
    ("all-linear", {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
])
def test_target_presets_pick_the_decoder_linears(preset, expected):
    model = _build(schema.LoraConfig(target_modules=preset))
    assert _targeted(model) == expected
    assert not any("lm_head" in name and "lora" in name for name, _ in model.named_parameters())


def test_modules_to_save_and_rslora_reach_peft():
    model = _build(schema.LoraConfig(r=4, alpha=8, target_modules=["q_proj"], use_rslora=True,
                                     modules_to_save=["lm_head"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / 4**0.5)  # alpha / sqrt(r), not alpha / r
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("lm_head.modules_to_save" in name for name in trainable)


def test_report_counts_4bit_weights_as_weights_not_bytes():
    from trainer.adapters import parameter_report

    lora = parameter_report(_build(schema.LoraConfig()))
    qlora = parameter_report(_build(schema.QLoraConfig()))
    assert qlora.total == lora.total and qlora.trainable == lora.trainable
    assert "trainable parameters: " in str(qlora)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prompt_learning_on_a_packed_row_equals_each_sample_alone(method, attn):
    """Packed rows share one block of virtual tokens; each sample's logits are those it gets alone."""
    cfg = schema.PromptTuningConfig(num_virtual_tokens=5) if method == "prompt_tuning" else \
        schema.PrefixTuningConfig(num_virtual_tokens=5)
    model = _build(cfg, attn=attn).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))
        a, b = torch.randint(5, 700, (1, 7), generator=generator), torch.randint(5, 700, (1, 4), generator=generator)
        alone = [model(input_ids=x, attention_mask=torch.ones_like(x)).logits for x in (a, b)]
        segment = torch.tensor([[0] * 7 + [1] * 4])
        mask = ((segment[:, :, None] == segment[:, None, :]) & torch.ones(11, 11, dtype=torch.bool).tril())[:, None]
        if attn == "eager":
            mask = torch.zeros(mask.shape).masked_fill_(~mask, torch.finfo(torch.float32).min)
        packed = model(input_ids=torch.cat([a, b], 1), attention_mask=mask,
                       position_ids=torch.tensor([list(range(7)) + list(range(4))])).logits
    assert packed.shape[1] == 11  # the virtual tokens' logits are dropped
    assert torch.allclose(packed[:, :7], alone[0], atol=2e-4)
    assert torch.allclose(packed[:, 7:], alone[1], atol=2e-4)


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_prompt_learning_greedy_decoding_with_a_cache_matches_full_recompute(method):
    """Decoding step by step (the KV cache holds the virtual tokens) gives the tokens a full forward would."""
    import contextlib

    from trainer.evaluate import greedy_generate
    from trainer.model import load_tokenizer

    cfg = schema.PromptTuningConfig(num_virtual_tokens=4) if method == "prompt_tuning" else \
        schema.PrefixTuningConfig(num_virtual_tokens=4)
    model = _build(cfg).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(0)))
    tokenizer = load_tokenizer(schema.ModelConfig(path=TINY))
    text = greedy_generate(model, tokenizer, ["The zorp"], 5, torch.device("cpu"), contextlib.nullcontext)[0]
    ids = [tokenizer.bos_token_id] + tokenizer("The zorp", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        for _ in range(5):
            logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids))).logits
            ids.append(int(logits[0, -1].argmax()))
    assert text == tokenizer.decode(ids[-5:], skip_special_tokens=True)


def test_static_freezing_by_pattern_and_depth():
    freeze = schema.FreezeConfig(patterns=[r"self_attn\.o_proj"], first_n_layers=2)
    model = _build(schema.LoraConfig(), freeze=freeze)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and not any("o_proj" in name for name in trainable)
    assert not any(".layers.0." in name or ".layers.1." in name for name in trainable)
    assert any(".layers.2." in name for name in trainable)
    with pytest.raises(ConfigError, match="optim.freeze.patterns.0"):
        _build(schema.LoraConfig(), freeze=schema.FreezeConfig(patterns=["no_such_module"]))


def test_layer_wise_lr_decay_gives_each_depth_its_learning_rate():
    from trainer.optim import param_groups

    model = _build(schema.NoPeftConfig())
    groups = param_groups(model, 0.1, lr=1.0, layer_lr_decay=0.5)
    by_name = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert by_name[id(named["lm_head.weight"])] == 1.0  # after the 4 layers: depth 5, decay^0
    assert by_name[id(named["model.layers.3.self_attn.q_proj.weight"])] == 0.5
    assert by_name[id(named["model.layers.0.self_attn.q_proj.weight"])] == 0.5**4
    assert by_name[id(named["model.embed_tokens.weight"])] == 0.5**5
    norms = [g for g in groups if any(p is named["model.layers.0.input_layernorm.weight"] for p in g["params"])]
    assert norms[0]["weight_decay"] == 0.0


def test_gradual_unfreezing_thaws_one_layer_per_interval_from_the_top():
    from trainer.freezing import build_freezing_schedule

    model = _build(schema.LoraConfig())
    schedule = build_freezing_schedule(model, schema.FreezeConfig(unfreeze_every_n_steps=2), report=lambda _: None)

    def trainable_layers() -> set[int]:
        return {int(n.split(".layers.")[1].split(".")[0]) for n, p in model.named_parameters()
                if p.requires_grad and ".layers." in n}

    expected = {0: {3}, 1: {3}, 2: {2, 3}, 5: {1, 2, 3}, 6: {0, 1, 2, 3}, 40: {0, 1, 2, 3}}
    for step, layers in expected.items():
        schedule.on_step(step)
        assert trainable_layers() == layers, step
    schedule.on_step(0)  # a resumed run at step 0 lands on the same schedule
    assert trainable_layers() == {3}


@pytest.mark.parametrize(("name", "class_name"), [
    ("adamw", "AdamW"), ("adamw_8bit", "AdamW8bit"), ("paged_adamw_8bit", "PagedAdamW8bit"),
    ("paged_adamw_32bit", "PagedAdamW32bit"),
])
def test_optimizers_build_and_step(name, class_name):
    pytest.importorskip("bitsandbytes")
    from trainer.optim import build_optimizer

    model = _build(schema.LoraConfig(target_modules=["q_proj"]))
    optimizer = build_optimizer(model, schema.OptimConfig(name=name, lr=2e-4, weight_decay=0.01))
    assert type(optimizer).__name__ == class_name
    before = [p.detach().clone() for g in optimizer.param_groups for p in g["params"]]
    model(input_ids=torch.randint(5, 700, (2, 8))).logits.float().pow(2).mean().backward()
    optimizer.step()
    after = [p for g in optimizer.param_groups for p in g["params"]]
    assert any(not torch.equal(a, b) for a, b in zip(after, before))
    assert {g["weight_decay"] for g in optimizer.param_groups} <= {0.0, 0.01}
