"""Merging additive adapters into their base: the merged model's logits equal the adapter model's.

Adapters are made in-process on the embedded tiny model and given random, non-zero weights (a fresh LoRA's B is
zero, which would make any merge look right). QLoRA merges into the de-quantised base, so its merged model is
compared with the adapter on the 4-bit base, as training saw it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

TINY = str(Path(__file__).resolve().parents[2] / "trainer" / "assets" / "tiny-llama")
CASES = {
    "lora": {"r": 8, "target_modules": "all-linear"},
    "rslora": {"r": 8, "target_modules": "attention", "use_rslora": True},
    "dora": {"r": 8, "target_modules": "mlp"},
    "ia3": {},
    "qlora": {"r": 8, "target_modules": "all-linear"},
}


def _peft_config(case: str):
    from trainer.config import schema

    if case == "ia3":
        return schema.IA3Config()
    if case == "dora":
        return schema.DoraConfig(**CASES[case])
    if case == "qlora":
        return schema.QLoraConfig(**CASES[case], dropout=0.0)
    return schema.LoraConfig(**CASES[case], dropout=0.0)


def _make_adapter(case: str, run_dir: Path) -> Path:
    """A trained-looking adapter saved like a run's final/, with the run's config.yaml beside it."""
    from trainer.config.schema import ModelConfig
    from trainer.model import build_model

    cfg = _peft_config(case)
    model = build_model(ModelConfig(path=TINY), cfg, "fp32")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))
    final = run_dir / "final"
    model.save_pretrained(final)
    quantization = {"quant_type": cfg.quant_type, "double_quant": cfg.double_quant, "compute_dtype": "auto",
                    "quant_storage": "uint8"} if case == "qlora" else {}
    peft_section = {"name": cfg.name, **quantization}
    (run_dir / "config.yaml").write_text(json.dumps({"peft": peft_section, "train": {"precision": "fp32"}}))
    return final


@pytest.mark.parametrize("case", list(CASES))
def test_merged_model_matches_the_adapter_model(tmp_path, case):
    from transformers import AutoModelForCausalLM

    from trainer.adapters import load_adapter_model, load_base_for_adapter, merge_adapter

    adapter_dir = _make_adapter(case, tmp_path / "run")
    ids = torch.randint(5, 700, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapter_model = load_adapter_model(load_base_for_adapter(str(adapter_dir), dtype="fp32"), str(adapter_dir))
        expected = adapter_model(input_ids=ids).logits
        with adapter_model.disable_adapter():
            base_logits = adapter_model(input_ids=ids).logits
        merged_dir = merge_adapter(str(adapter_dir), str(tmp_path / "merged"), dtype="fp32")
        merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
        got = merged(input_ids=ids).logits
    assert not any(name for name, _ in merged.named_parameters() if "lora" in name or "ia3" in name)
    # fp32 logits of size ~10: merging reorders the sums, which moves them by ~1e-4
    assert torch.allclose(got, expected, atol=2e-3), float((got - expected).abs().max())
    # the adapter really changes the model, so the equality above means something
    assert float((expected - base_logits).abs().max()) > 1e-2
    assert (Path(merged_dir) / "tokenizer_config.json").is_file()


def test_qlora_merges_into_the_dequantised_base_not_the_original(tmp_path):
    """The QLoRA adapter learnt on the 4-bit base: merging into the full-precision original would add the
    quantisation error back; de-quantised, the merged weights differ from the original by about that error."""
    from transformers import AutoModelForCausalLM

    from trainer.adapters import merge_adapter

    adapter_dir = _make_adapter("qlora", tmp_path / "run")
    (tmp_path / "run" / "final" / "adapter_model.safetensors").unlink()  # a zero adapter: merged == base
    from peft import LoraConfig, get_peft_model

    zero = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), LoraConfig(r=8, target_modules="all-linear"))
    zero.save_pretrained(tmp_path / "zero")
    (tmp_path / "run" / "final" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "zero" / "adapter_model.safetensors").read_bytes())
    merged = AutoModelForCausalLM.from_pretrained(merge_adapter(str(adapter_dir), str(tmp_path / "m"), dtype="fp32"))
    original = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    w_merged = merged.model.layers[0].self_attn.q_proj.weight
    w_original = original.model.layers[0].self_attn.q_proj.weight
    error = float((w_merged - w_original).abs().mean() / w_original.abs().mean())  # no grad: from_pretrained
    assert 0.01 < error < 0.2  # NF4's typical relative error: de-quantised, not the original


def test_prompt_learning_adapters_do_not_merge(tmp_path):
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.adapters import merge_adapter
    from trainer.errors import UserError

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY),
                           PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    model.save_pretrained(tmp_path / "pt")
    with pytest.raises(UserError, match="only additive adapters"):
        merge_adapter(str(tmp_path / "pt"), str(tmp_path / "out"))
