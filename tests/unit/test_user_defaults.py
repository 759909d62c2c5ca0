"""A user's own model and data never run on the embedded demo's settings; bare `trainer train` still is the demo.

The model dir holds the real Llama-3.1-8B-Instruct architecture (131,072-token context) as a config.json only:
composing, `--cfg job`, `trainer plan` and the Slurm dry run read nothing else."""

from __future__ import annotations

import json

import pytest

from tests.conftest import FIXTURES, REPO, compose_config, run_cli

LLAMA_31_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
               "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
               "num_key_value_heads": 8, "max_position_embeddings": 131072, "tie_word_embeddings": False,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}}
DEMO_ONLY = {"data.max_seq_len": 104, "data.template": "alpaca", "optim.lr": 1e-3, "train.epochs": 8,
             "eval.generate_samples": 60, "run.name": "tiny-llama-lora"}


@pytest.fixture()
def user_model(tmp_path):
    model = tmp_path / "Llama-3.1-8B-Instruct"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_31_8B))
    return model


def _value(config, dotted: str):
    node = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _demo_values_in_effect(config) -> dict:
    return {key: _value(config, key) for key, demo in DEMO_ONLY.items() if _value(config, key) == demo}


def test_a_users_model_and_data_get_defaults_for_that_model_not_the_demos(user_model, tmp_path):
    from trainer.config.defaults import auto_precision

    data = FIXTURES / "data" / "chat.jsonl"
    config = compose_config(f"model.path={user_model}", f"data.path={data}", f"run.dir={tmp_path / 'run'}")
    assert _demo_values_in_effect(config) == {}
    assert config.data.max_seq_len == 2048  # the model's 131,072-token context, capped at 2048
    assert config.data.template == "auto" and config.data.val_path is None
    assert config.data.format == "chat"  # detected from the file's first record, and frozen as such
    assert config.optim.lr == 2e-4 and config.train.epochs == 3
    assert config.train.precision == auto_precision("single", config.launcher)[0] != "auto"
    assert config.eval.forgetting_path is None and config.eval.generate_samples == 0
    assert config.run.name == "Llama-3.1-8B-Instruct-chat-lora"


@pytest.mark.parametrize("peft,lr", [("none", 2e-5), ("lora", 2e-4), ("qlora", 2e-4), ("dora", 2e-4),
                                     ("ia3", 3e-3)])
def test_the_learning_rate_follows_the_method_unless_given(user_model, peft, lr, tmp_path):
    data = f"data.path={FIXTURES / 'data' / 'alpaca.json'}"
    assert compose_config(f"model.path={user_model}", data, f"peft={peft}").optim.lr == lr
    assert compose_config(f"model.path={user_model}", data, f"peft={peft}", "optim.lr=5e-5").optim.lr == 5e-5


@pytest.mark.parametrize("peft,lr", [("none", 2e-6), ("lora", 2e-5)])
def test_preference_objectives_default_to_a_tenth_of_the_sft_learning_rate(user_model, peft, lr):
    data = f"data.path={FIXTURES / 'data' / 'preference.json'}"
    config = compose_config(f"model.path={user_model}", data, f"peft={peft}", "objective.name=dpo")
    assert config.optim.lr == pytest.approx(lr)
    assert compose_config(f"model.path={user_model}", data, "objective.name=dpo", "optim.lr=5e-7").optim.lr == 5e-7


def test_a_short_context_model_caps_max_seq_len_and_a_named_length_wins(tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    (short / "config.json").write_text(json.dumps({**LLAMA_31_8B, "max_position_embeddings": 512}))
    data = f"data.path={FIXTURES / 'data' / 'alpaca.json'}"
    assert compose_config(f"model.path={short}", data).data.max_seq_len == 512
    assert compose_config(f"model.path={short}", data, "data.max_seq_len=128").data.max_seq_len == 128


def test_bare_train_is_still_the_embedded_demo(tmp_path):
    demo = compose_config(f"run.dir={tmp_path}")
    assert _demo_values_in_effect(demo) == DEMO_ONLY
    tweaked = compose_config(f"run.dir={tmp_path}", "optim.lr=5e-4")  # a demo setting changed: still the demo
    assert tweaked.optim.lr == 5e-4 and tweaked.data.max_seq_len == 104


def test_cfg_job_prints_what_the_run_would_freeze_and_refuses_what_train_refuses(user_model, tmp_path):
    data = FIXTURES / "data" / "alpaca.json"
    result = run_cli("train", f"model.path={user_model}", f"data.path={data}", "--cfg", "job", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "max_seq_len: 2048" in result.stdout and "lr: 0.0002" in result.stdout and "auto" not in (
        result.stdout.split("precision:")[1].splitlines()[0])
    assert "defaults for this model and data: optim.lr=0.0002" in result.stderr
    assert "data.format=alpaca (detected from" in result.stderr
    refused = run_cli("train", f"model.path={user_model}", f"data.path={data}", "train.global_batch_size=7",
                      "--cfg", "job", timeout=120)
    assert refused.returncode == 2 and "train.global_batch_size: 7 is not a multiple" in refused.stderr


def test_data_check_uses_the_tokenizers_template_and_context_for_a_users_chat_file(tmp_path):
    chat = FIXTURES / "data" / "chat.jsonl"
    result = run_cli("data", "check", f"data.path={chat}", f"paths.cache_dir={tmp_path}",
                     "train.micro_batch_size=1", "train.global_batch_size=1", timeout=300)
    assert result.returncode == 0, result.stderr
    header = result.stdout.splitlines()[0]
    # The embedded tokenizer's own (ChatML) template and its 256-token context, not the demo's alpaca at 104.
    assert "template the tokenizer's own chat template; max_seq_len 256" in header
    assert "<|im_start|>assistant" in result.stdout


def test_plan_and_slurm_dry_run_see_the_same_defaults(user_model, tmp_path):
    data = FIXTURES / "data" / "alpaca.json"
    plan = run_cli("plan", f"model.path={user_model}", f"data.path={data}", "--json", timeout=120)
    assert plan.returncode == 0, plan.stderr
    configured = json.loads(plan.stdout)["configured"]
    assert configured["peft_method"] == "lora" and json.loads(plan.stdout)["recommendation"] is not None
    run_dir = tmp_path / "run"
    dry = run_cli("train", f"model.path={user_model}", f"data.path={data}", "launcher=slurm", "launcher.dry_run=true",
                  "launcher.gpus_per_node=1", f"run.dir={run_dir}", timeout=120)
    assert dry.returncode == 0, dry.stderr
    assert "--job-name=Llama-3.1-8B-Instruct-alpaca-lora" in dry.stdout
    frozen = (run_dir / "config.yaml").read_text()
    assert "max_seq_len: 2048" in frozen and "precision: bf16" in frozen and "lr: 0.0002" in frozen


def test_make_demo_still_shows_the_demo(tmp_path):
    result = run_cli("train", "--cfg", "job", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "name: tiny-llama-lora" in result.stdout and "max_seq_len: 104" in result.stdout
    assert str(REPO / "trainer" / "assets" / "demo-facts" / "general.txt") in result.stdout


def test_gemma_2_gets_eager_attention_and_sdpa_is_refused_in_one_line(tmp_path):
    from trainer.errors import ConfigError

    gemma2 = tmp_path / "gemma-2-9b"
    gemma2.mkdir()
    (gemma2 / "config.json").write_text(json.dumps({"model_type": "gemma2", "max_position_embeddings": 8192,
                                                    "attn_logit_softcapping": 50.0}))
    data = f"data.path={FIXTURES / 'data' / 'alpaca.json'}"
    assert compose_config(f"model.path={gemma2}", data).model.attn_implementation == "eager"
    assert compose_config("model=tiny-llama", data).model.attn_implementation == "sdpa"
    with pytest.raises(ConfigError, match="model.attn_implementation: sdpa cannot apply its attention logit"):
        compose_config(f"model.path={gemma2}", data, "model.attn_implementation=sdpa")
