"""Parameter counts (trainer.plan.params) and trainable counts (trainer.plan.trainable).

The published totals are the external truth; the transformers/peft cross-checks build the real classes on the meta
device (no weights), so they catch layout changes in new library versions.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from trainer.plan.params import count_parameters, load_arch
from trainer.plan.trainable import count_trainable, resolve_targets

REPO = Path(__file__).resolve().parents[2]
CONF_MODEL = REPO / "conf" / "model"
SHARED_MODELS = Path("/work/shared/data/models")

# Published parameter counts (model cards, safetensors index totals, the Mixtral paper's 46.7B).
PUBLISHED = {
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3.1-8b": 8_030_261_248,
    "llama-3.1-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
    "mixtral-8x7b": 46_702_792_704,
    "qwen2-7b": 7_615_616_512,
    "qwen2-72b": 72_706_203_648,
    "qwen2.5-72b": 72_706_203_648,
    "gemma-2-9b": 9_241_705_984,
    "gemma-2b": 2_506_172_416,
    "phi-3-mini": 3_821_079_552,
}


def _model_conf(name: str) -> dict:
    with (CONF_MODEL / f"{name}.yaml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)  # plain YAML: interpolations stay unresolved strings


def test_conf_model_has_every_published_model():
    assert set(PUBLISHED) <= {path.stem for path in CONF_MODEL.glob("*.yaml")}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_conf_model_total_matches_published_count(name):
    conf = _model_conf(name)
    assert conf["name"] == name
    assert count_parameters(conf["arch"]).total == PUBLISHED[name]


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason="reference configs not available")
@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_json_counts_like_conf_model(name):
    conf = _model_conf(name)
    folder = SHARED_MODELS / Path(conf["path"]).name
    assert count_parameters(load_arch(folder)).total == count_parameters(conf["arch"]).total
    assert count_parameters(load_arch(folder / "config.json")).total == PUBLISHED[name]


def test_gemma_ties_embeddings_when_the_key_is_absent():
    arch = dict(_model_conf("gemma-2b")["arch"])
    del arch["tie_word_embeddings"]
    counted = count_parameters(arch)
    assert counted.tied_embeddings and counted.lm_head == 0
    assert counted.total == PUBLISHED["gemma-2b"]
    llama = dict(_model_conf("llama-2-7b")["arch"])
    del llama["tie_word_embeddings"]
    assert not count_parameters(llama).tied_embeddings  # llama's class default is untied


def test_explicit_head_dim_wins_over_hidden_over_heads():
    arch = _model_conf("gemma-2-9b")["arch"]
    assert arch["hidden_size"] // arch["num_attention_heads"] == 224
    assert count_parameters(arch).head_dim == 256


def test_qwen2_biases_and_non_embedding_count():
    arch = _model_conf("qwen2-7b")["arch"]
    counted = count_parameters(arch)
    as_llama = count_parameters({**arch, "model_type": "llama"})
    layers, kv_dim = arch["num_hidden_layers"], counted.kv_dim
    assert counted.total - as_llama.total == layers * (counted.q_dim + 2 * kv_dim)
    assert round(counted.non_embedding / 1e9, 2) == 6.53  # model card: "6.53B non-embedding"


def test_phi3_fused_projections_count_like_separate_ones():
    arch = _model_conf("phi-3-mini")["arch"]
    assert count_parameters(arch).total == count_parameters({**arch, "model_type": "llama"}).total
    names = [m.name for m in count_parameters(arch).linear_modules]
    assert names == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def test_mixtral_router_and_active_parameters():
    counted = count_parameters(_model_conf("mixtral-8x7b")["arch"])
    assert counted.router_per_layer == 8 * 4096
    assert round(counted.active / 1e9, 1) == 12.9  # "13B active"
    assert counted.quantizable < counted.total / 10  # experts stay 16-bit under bitsandbytes (transformers 5)


def test_unknown_model_type_falls_back_to_llama_layout_with_a_flag():
    arch = {**_model_conf("llama-2-7b")["arch"], "model_type": "newfangled"}
    counted = count_parameters(arch)
    assert counted.assumed_layout and "llama layout" in counted.notes[0]
    assert counted.total == PUBLISHED["llama-2-7b"]
    assert not count_parameters(_model_conf("llama-2-7b")["arch"]).assumed_layout


@pytest.mark.parametrize("key", ["model_type", "hidden_size", "vocab_size", "num_hidden_layers"])
def test_missing_key_is_named(key):
    arch = dict(_model_conf("llama-2-7b")["arch"])
    del arch[key]
    with pytest.raises(ValueError, match=key):
        count_parameters(arch)


def test_load_arch_reports_missing_config(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_arch(tmp_path)


def test_planner_does_not_import_torch():
    code = "import sys, trainer.plan; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})


# ----- trainable parameters -------------------------------------------------------------------------------------------


def test_lora_counts_rank_times_in_plus_out():
    counted = count_parameters(_model_conf("llama-2-7b")["arch"])
    lora = count_trainable(counted, "lora", r=8, target_modules="q_proj,v_proj")
    assert lora.total == 32 * 2 * 8 * (4096 + 4096)  # the figure peft prints for Llama-2-7B: 4,194,304
    dora = count_trainable(counted, "dora", r=8, target_modules=["q_proj", "v_proj"])
    assert dora.total == lora.total + 32 * 2 * 4096
    assert count_trainable(counted, "qlora", r=8, target_modules="q_proj,v_proj").total == lora.total


def test_ia3_default_vectors_and_prefix_sizes():
    counted = count_parameters(_model_conf("llama-3.1-8b")["arch"])
    ia3 = count_trainable(counted, "ia3")  # k_proj, v_proj (out = kv_dim) and down_proj (in = intermediate)
    assert ia3.total == 32 * (1024 + 1024 + 14336)
    assert count_trainable(counted, "prompt_tuning", num_virtual_tokens=20).total == 20 * 4096
    assert count_trainable(counted, "prefix_tuning", num_virtual_tokens=20).total == 20 * 2 * 32 * 1024


def test_moe_expert_adapters_multiply_by_experts():
    counted = count_parameters(_model_conf("mixtral-8x7b")["arch"])
    experts = count_trainable(counted, "lora", r=8, target_modules="w1,w2,w3")
    hidden, inter = 4096, 14336
    per_layer = 8 * (2 * 8 * (hidden + 2 * inter) + 8 * (inter + hidden))  # fused gate_up at rank 2r, like peft
    assert experts.total == 32 * per_layer
    with pytest.raises(ValueError, match="fused"):
        count_trainable(counted, "lora", target_modules="w1")


def test_target_names_that_match_nothing():
    phi3 = count_parameters(_model_conf("phi-3-mini")["arch"])
    with pytest.raises(ValueError, match="qkv_proj"):
        count_trainable(phi3, "lora", target_modules="q_proj,v_proj")
    _, unmatched = resolve_targets(phi3, "q_proj,o_proj")
    assert unmatched == ("q_proj",)
    with pytest.raises(ValueError, match="peft_method"):
        count_trainable(phi3, "adalora")


# ----- cross-checks against transformers and peft (torch, no weights) ---------------------------------------------

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
TINY_VARIANTS = {
    "llama": {},
    "llama-biases": {"attention_bias": True, "mlp_bias": True},
    "mistral": {},
    "qwen2": {},
    "qwen2-tied": {"tie_word_embeddings": True},
    "gemma": {"head_dim": 24},
    "gemma2": {"head_dim": 24},
    "phi3": {},
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2},
}


def _tiny_model(variant: str):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = transformers.AutoConfig.for_model(variant.split("-")[0], **TINY, **TINY_VARIANTS[variant])
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config)
    return model, config.to_dict()


@pytest.mark.parametrize("variant", sorted(TINY_VARIANTS))
def test_count_matches_transformers_classes(variant):
    model, arch = _tiny_model(variant)
    assert count_parameters(arch).total == sum(p.numel() for p in model.parameters())


PEFT_CASES = [
    ("llama", "lora", {"r": 4, "target_modules": ["q_proj", "v_proj"]}),
    ("llama", "lora", {"r": 4, "target_modules": "all-linear"}),
    ("llama", "dora", {"r": 4, "target_modules": "all-linear"}),
    ("llama", "ia3", {}),
    ("llama", "prompt_tuning", {"num_virtual_tokens": 7}),
    ("llama", "prefix_tuning", {"num_virtual_tokens": 7}),
    ("qwen2", "ia3", {}),
    ("gemma2", "lora", {"r": 4, "target_modules": "all-linear"}),
    ("gemma2", "prefix_tuning", {"num_virtual_tokens": 7}),
    ("phi3", "lora", {"r": 4, "target_modules": "all-linear"}),
    ("mixtral", "lora", {"r": 4, "target_modules": "all-linear"}),
]


def _peft_config(method: str, options: dict):
    peft = pytest.importorskip("peft")
    if method in ("lora", "dora"):
        return peft.LoraConfig(r=options["r"], target_modules=options["target_modules"], use_dora=method == "dora")
    if method == "ia3":
        return peft.IA3Config()
    config_class = peft.PromptTuningConfig if method == "prompt_tuning" else peft.PrefixTuningConfig
    return config_class(task_type="CAUSAL_LM", num_virtual_tokens=options["num_virtual_tokens"])


@pytest.mark.filterwarnings("ignore")
@pytest.mark.parametrize(("variant", "method", "options"), PEFT_CASES)
def test_trainable_count_matches_peft(variant, method, options):
    peft = pytest.importorskip("peft")
    model, arch = _tiny_model(variant)
    wrapped = peft.get_peft_model(model, _peft_config(method, options))
    expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    assert count_trainable(count_parameters(arch), method, **options).total == expected


@pytest.mark.filterwarnings("ignore")
def test_expert_lora_count_matches_the_adapters_the_trainer_builds():
    """peft.experts=true: the planner's count equals what trainer/adapters.py makes PEFT create (rank r per expert on
    the fused gate_up_proj and down_proj, beside all-linear's attention), and Mixtral-8x7B's figure at r=16."""
    peft = pytest.importorskip("peft")
    from launch.plan import planner_targets
    from trainer.adapters import build_peft_config
    from trainer.config.peft_schema import LoraConfig

    model, arch = _tiny_model("mixtral")
    wrapped = peft.get_peft_model(model, build_peft_config(LoraConfig(r=4, dropout=0.0, experts=True), model))
    expected = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    params = count_parameters(arch)
    counted = count_trainable(params, "lora", r=4, target_modules=planner_targets("all-linear", params), experts=True)
    assert counted.total == expected
    real = count_parameters(_model_conf("mixtral-8x7b")["arch"])
    full = count_trainable(real, "lora", r=16, target_modules=planner_targets("all-linear", real), experts=True)
    hidden, inter = 4096, 14336
    assert full.total == 13_631_488 + 32 * 8 * 16 * ((hidden + 2 * inter) + (inter + hidden))  # 223,346,688
    with pytest.raises(ValueError, match="no fused expert weights"):
        count_trainable(count_parameters(_model_conf("llama-3.1-8b")["arch"]), "lora", experts=True)
    from trainer.plan import PlanInputs, estimate_memory

    with pytest.raises(ValueError, match="peft.experts"):  # what `trainer train` refuses, the planner marks n/a
        estimate_memory(PlanInputs(_model_conf("mixtral-8x7b")["arch"], peft_method="lora", lora_experts=True,
                                   strategy="fsdp", gpus_per_node=2))
