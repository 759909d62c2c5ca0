"""GGUF export read back with the gguf package's own reader: names, shapes, metadata and values.

The rotary reordering of q/k rows is checked for what it is for: attention scores computed with transformers'
rotate-half rope on the original weights equal those computed with ggml's adjacent-pair rope on the exported ones.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
gguf = pytest.importorskip("gguf")

from trainer.errors import UserError  # noqa: E402
from trainer.export_gguf import write_lora_adapter, write_model  # noqa: E402
from trainer.export_gguf.layout import interleave_rotary_rows, undo_interleave_rotary_rows  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "trainer" / "assets" / "tiny-llama")
LAYERS, HEADS, KV_HEADS = 4, 4, 2
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def _adapter(tmp_path: Path, name: str = "lora", **options) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    config = LoraConfig(r=options.pop("r", 8), lora_alpha=16, target_modules="all-linear", **options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY), config)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.normal_(0, 0.1, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(tmp_path / name)
    return tmp_path / name


def _read(path: Path):
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    return fields, {t.name: t for t in reader.tensors}


def _peft_tensors(adapter_dir: Path) -> dict:
    from safetensors.torch import load_file

    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    return {name.removeprefix("base_model.model."): tensor for name, tensor in tensors.items()}


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_adapter_reads_back_with_llama_cpp_names_orientation_and_alpha(tmp_path, rslora):
    adapter = _adapter(tmp_path, use_rslora=rslora)
    out = write_lora_adapter(str(adapter), str(tmp_path / "a.gguf"), base_dir=TINY)
    fields, tensors = _read(Path(out))
    assert fields["general.architecture"] == "llama"
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    # llama.cpp scales by alpha / r; rsLoRA's alpha / sqrt(r) is written as alpha * sqrt(r)
    assert fields["adapter.lora.alpha"] == pytest.approx(16 * 8**0.5 if rslora else 16)
    expected = {f"blk.{i}.{g}.weight.lora_{ab}" for i in range(LAYERS) for g in HF_TO_GGUF.values() for ab in "ab"}
    assert set(tensors) == expected
    peft = _peft_tensors(adapter)
    for layer in range(LAYERS):
        for hf, gg in HF_TO_GGUF.items():
            a = peft[f"model.layers.{layer}.{hf}.lora_A.weight"].numpy()  # [r, in]
            b = peft[f"model.layers.{layer}.{hf}.lora_B.weight"].numpy()  # [out, r]
            got_a, got_b = tensors[f"blk.{layer}.{gg}.weight.lora_a"], tensors[f"blk.{layer}.{gg}.weight.lora_b"]
            # GGUF shapes list ne0 first: lora_a ne0 = in (= the base weight's ne0), lora_b ne1 = out
            assert list(got_a.shape) == [a.shape[1], 8] and list(got_b.shape) == [8, b.shape[0]]
            assert (got_a.data == a).all()
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gg)
            assert (undo_interleave_rotary_rows(got_b.data, heads) if heads else got_b.data) == pytest.approx(b)


@pytest.mark.parametrize(("options", "fragment"), [
    ({"use_dora": True}, "DoRA"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_adapters_llama_cpp_cannot_load_are_refused(tmp_path, options, fragment):
    adapter = _adapter(tmp_path, **options)
    with pytest.raises(UserError, match=fragment):
        write_lora_adapter(str(adapter), str(tmp_path / "a.gguf"), base_dir=TINY)


def _rope(x, positions, pairs: str):
    """Rotary embedding over the last dim: rotate-half pairs (i, i + d/2) or adjacent pairs (2i, 2i+1)."""
    dim = x.shape[-1]
    freqs = 10000.0 ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    angle = positions[:, None].double() * freqs[None]
    cos, sin = angle.cos(), angle.sin()
    if pairs == "half":
        first, second = x[..., : dim // 2], x[..., dim // 2:]
        return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)


def test_interleaved_rows_give_the_same_attention_scores_under_ggml_rope():
    generator = torch.Generator().manual_seed(0)
    heads, head_dim, hidden, tokens = 4, 16, 32, 6
    w_q = torch.randn(heads * head_dim, hidden, dtype=torch.float64, generator=generator)
    w_k = torch.randn(heads * head_dim, hidden, dtype=torch.float64, generator=generator)
    x = torch.randn(tokens, hidden, dtype=torch.float64, generator=generator)
    positions = torch.arange(tokens)

    def scores(wq, wk, pairs):
        q = (x @ wq.T).view(tokens, heads, head_dim).transpose(0, 1)
        k = (x @ wk.T).view(tokens, heads, head_dim).transpose(0, 1)
        return _rope(q, positions, pairs) @ _rope(k, positions, pairs).transpose(-1, -2)

    hf = scores(w_q, w_k, "half")
    ggml = scores(*(torch.from_numpy(interleave_rotary_rows(w.numpy(), heads)) for w in (w_q, w_k)), "pairs")
    assert torch.allclose(hf, ggml, atol=1e-9)
    assert (undo_interleave_rotary_rows(interleave_rotary_rows(w_q.numpy(), heads), heads) == w_q.numpy()).all()


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_model_reads_back_with_hyperparameters_tokenizer_and_weights(tmp_path, dtype):
    from transformers import AutoModelForCausalLM

    out = write_model(TINY, str(tmp_path / f"m-{dtype}.gguf"), dtype=dtype)
    fields, tensors = _read(Path(out))
    config = json.loads((Path(TINY) / "config.json").read_text())
    assert fields["general.type"] == "model" and fields["general.architecture"] == "llama"
    assert fields["general.file_type"] == {"f32": 0, "f16": 1, "q8_0": 7}[dtype]
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"]) == (
        LAYERS, config["hidden_size"], config["intermediate_size"])
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (HEADS, KV_HEADS)
    assert fields["llama.rope.dimension_count"] == config["head_dim"]
    assert fields["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == config["vocab_size"] and tokens[:3] == ["<unk>", "<s>", "</s>"]
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.eos_token_id"] == 2
    assert "<|im_start|>" in fields["tokenizer.chat_template"]

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    hf = {name: tensor.detach().numpy() for name, tensor in model.state_dict().items()}
    assert len(tensors) == 2 + 1 + LAYERS * 9  # embedding, output + final norm, 7 linears + 2 norms per layer
    tolerance = {"f32": 0, "f16": 2e-3, "q8_0": 2e-2}[dtype]
    for layer in range(LAYERS):
        for hf_name, gg in [*HF_TO_GGUF.items(), ("input_layernorm", "attn_norm"),
                            ("post_attention_layernorm", "ffn_norm")]:
            tensor = tensors[f"blk.{layer}.{gg}.weight"]
            expected = hf[f"model.layers.{layer}.{hf_name}.weight"]
            assert list(tensor.shape) == list(reversed(expected.shape))
            data = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(expected.shape)
            heads = {"attn_q": HEADS, "attn_k": KV_HEADS}.get(gg)
            data = undo_interleave_rotary_rows(data, heads) if heads else data
            if expected.ndim == 1:
                assert tensor.tensor_type == gguf.GGMLQuantizationType.F32 and (data == expected).all()
            else:
                assert abs(data - expected).max() <= tolerance * max(abs(expected).max(), 1)
    assert tensors["output.weight"].tensor_type == {"f32": 0, "f16": 1, "q8_0": 8}[dtype]


def test_unsupported_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "num_hidden_layers": 2}))
    with pytest.raises(UserError, match="no GGUF exporter"):
        write_model(str(tmp_path), str(tmp_path / "m.gguf"))


def test_command_line_merges_an_adapter_and_writes_q8_0(tmp_path):
    adapter = _adapter(tmp_path)
    out = tmp_path / "merged.gguf"
    result = subprocess.run([sys.executable, "-m", "trainer.export_gguf", "model", str(adapter), str(out),
                             "--dtype", "q8_0"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    fields, tensors = _read(out)
    assert fields["general.file_type"] == 7 and "blk.3.attn_q.weight" in tensors


def test_llama3_rope_factors_give_transformers_frequencies():
    """rope_freqs.weight holds divisors: base frequency / factor must be transformers' llama3 inv_freq."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from trainer.export_gguf.arch import llama3_rope_factors
    from trainer.replicas import shrink

    for family in ("llama-3.1", "llama-3.2"):
        config = shrink(family)
        config["head_dim"] = 64  # enough dimensions to cover all three bands (kept, blended, divided)
        inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](LlamaConfig(**config))
        base = 500000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
        factors = torch.from_numpy(llama3_rope_factors(config)).double()
        assert set(factors.tolist()) > {1.0, config["rope_scaling"]["factor"]}  # all three bands present
        assert torch.allclose(base / factors, inv_freq.double(), rtol=1e-5)


def _model_dir(tmp_path: Path, config: dict) -> Path:
    import shutil

    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    base = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**base, **config}))
    return model


@pytest.mark.parametrize(("config", "fragment"), [
    ({"model_type": "phi3", "rope_parameters": None,  # an older config: rope_scaling, its kind called `type`
      "rope_scaling": {"type": "longrope", "long_factor": [1.0], "short_factor": [1.0]}}, "LongRoPE"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "yarn"),
    ({"model_type": "gemma", "hidden_act": "gelu", "tie_word_embeddings": False}, "tie_word_embeddings"),
    ({"model_type": "qwen2", "use_sliding_window": True}, "use_sliding_window"),
    ({"hidden_act": "relu"}, "hidden_act"),
])
def test_configs_llama_cpp_would_run_differently_are_refused_in_one_line_before_writing(tmp_path, config, fragment):
    model = _model_dir(tmp_path, config)
    out = tmp_path / "m.gguf"
    result = subprocess.run([sys.executable, "-m", "trainer.export_gguf", "model", str(model), str(out)],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2 and fragment in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.glob("*.gguf*")) == [] and not list(tmp_path.glob(".m.gguf*"))


def test_a_sentencepiece_style_tokenizer_that_llama_cpp_would_split_otherwise_is_refused(tmp_path):
    """Byte-fallback BPE is written as llama.cpp's SentencePiece vocab (the families' tests run it in llama.cpp);
    text preparation llama.cpp cannot do -- a unicode normalizer, Metaspace splitting words apart -- is refused."""
    model = _model_dir(tmp_path, {})
    spec = json.loads((model / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "always", "split": True}
    spec["normalizer"] = {"type": "NFKC"}
    spec["model"]["byte_fallback"] = True
    (model / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(UserError, match=r"tokenizer.json: a byte-fallback BPE tokenizer whose text preparation "
                                        r"\(NFKC, Metaspace\) has no llama.cpp counterpart"):
        write_model(str(model), str(tmp_path / "m.gguf"))
    assert not list(tmp_path.glob("*.gguf"))
