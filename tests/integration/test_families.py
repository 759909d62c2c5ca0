"""Every model family the experiments name trains through the CLI, on a small replica of its real architecture
(trainer/replicas.py): real vocabulary, RoPE scaling, tied embeddings, biases, soft-capping, experts, fused
projections, and the family's own chat format."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, assert_one_line_error, read_summary, run_cli, train_losses

FAMILY_LINEARS = {  # what LoRA's all-linear must reach in each family (module names differ)
    "llama-2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "llama-3.1": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "llama-3.2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mistral": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "mixtral": {"q_proj", "k_proj", "v_proj", "o_proj"},  # experts are fused 3-D weights: not nn.Linear
    "qwen2.5": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "gemma-2": {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"},
    "phi-3": {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"},
}
# The real configs' quirks that a replica must keep (the figures are the real config.json's).
QUIRKS = {
    "llama-3.1": {"vocab_size": 128256, "rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
    "llama-3.2": {"vocab_size": 128256, "tie_word_embeddings": True},
    "mistral": {"sliding_window": 4096},
    "mixtral": {"num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02},
    "qwen2.5": {"vocab_size": 152064},
    "gemma": {"vocab_size": 256000, "num_key_value_heads": 1},
    "gemma-2": {"final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0},
    "phi-3": {"vocab_size": 32064},
}
CHAT = REPO / "tests/fixtures/data/chat.jsonl"
LLAMA3_TURN = "<|start_header_id|>assistant<|end_header_id|>"
TURN_MARKERS = {"llama-2": "[/INST]", "llama-3.1": LLAMA3_TURN, "llama-3.2": LLAMA3_TURN, "mistral": "[/INST]",
                "mixtral": "[/INST]", "qwen2.5": "<|im_start|>assistant", "gemma": "<start_of_turn>model",
                "gemma-2": "<start_of_turn>model", "phi-3": "<|assistant|>"}


def _train_briefly(model_dir, run_dir, cache_dir, *overrides: str):
    """Two steps of one chat row on a replica through the CLI; the run must complete."""
    result = run_cli("train", f"model.path={model_dir}", f"data.path={REPO / 'tests/fixtures/data/chat.jsonl'}",
                     f"run.dir={run_dir}", "data.max_seq_len=64", "data.val_ratio=0", "train.max_steps=2",
                     "train.micro_batch_size=1", "train.global_batch_size=1", "eval.max_batches=1",
                     "logger.progress=false", "logger.plot=false", f"paths.cache_dir={cache_dir}", *overrides,
                     timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    from trainer.replicas import FAMILIES, build_replica

    root = tmp_path_factory.mktemp("replicas")
    return {family: build_replica(family, root / family) for family in FAMILIES}


def test_replicas_keep_the_real_quirks_and_the_gqa_ratio(replicas):
    from trainer.replicas import FAMILIES

    for family, quirks in QUIRKS.items():
        config = json.loads((replicas[family] / "config.json").read_text())
        for key, value in quirks.items():
            got = config.get(key)
            if key == "rope_scaling":  # transformers 5 writes the RoPE settings as rope_parameters
                got = config.get("rope_parameters") or got
            if isinstance(value, dict):
                got = {k: got.get(k) for k in value}
            assert got == value, (family, key)
        real = FAMILIES[family]["config"]
        assert (config["num_attention_heads"] // config["num_key_value_heads"]
                == real["num_attention_heads"] // real["num_key_value_heads"]), family
        assert config["num_hidden_layers"] == 2


@pytest.mark.slow  # every family, in `make test`: each cell of docs/models.md's table is a test CI runs
@pytest.mark.parametrize("family", list(FAMILY_LINEARS))
def test_lora_trains_every_family_through_the_cli_with_its_chat_template(family, replicas, tmp_path):
    run_dir = tmp_path / "run"
    # A large step, so that the adapter visibly changes the logits.
    result = _train_briefly(replicas[family], run_dir, tmp_path / "cache", "optim.lr=1e-2")
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["steps"] == 2
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == FAMILY_LINEARS[family]
    assert "template the tokenizer's own chat template" in result.stdout + result.stderr
    if family == "mixtral":  # the router's load-balancing loss trains with it, logged apart
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_steps = [m for m in logged if "loss" in m]
        assert train_steps and all(0 < m["router_aux_loss"] < 1 for m in train_steps)
    _merged_export_equals_the_adapter_on_its_base(replicas[family], run_dir, tmp_path / "merged")
    # The family's own turn format is what the model was trained on.
    check = run_cli("data", "check", f"model.path={replicas[family]}", "train.micro_batch_size=1",
                    f"data.path={REPO / 'tests/fixtures/data/chat.jsonl'}", "train.global_batch_size=1",
                    f"paths.cache_dir={tmp_path / 'cache'}", timeout=300)
    assert check.returncode == 0, check.stderr
    assert TURN_MARKERS[family] in check.stdout


def _merged_export_equals_the_adapter_on_its_base(base_dir, run_dir, out):
    """`trainer export --to merged` folds the adapter into the base: the same logits as base + adapter (fp32), and
    not the base's own (tied embeddings, fused projections and soft-capping included)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    exported = run_cli("export", str(run_dir), "--to", "merged", "--out", str(out), "--dtype", "fp32", timeout=300)
    assert exported.returncode == 0, exported.stderr[-2000:]
    ids = torch.tensor([[2, 17, 230, 5, 99, 400, 12, 3]])

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    def base():
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)

    plain = logits(base())
    with_adapter = logits(PeftModel.from_pretrained(base(), run_dir / "final"))
    merged = logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    assert not torch.allclose(with_adapter, plain, atol=1e-4)
    assert torch.allclose(merged, with_adapter, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_lora_on_mixtrals_fused_experts_trains_every_expert_and_merges(replicas, tmp_path):
    """peft.experts=true: LoRA on each expert's gate/up and down weights as well (PEFT's target_parameters, rank r per
    expert), counted as `trainer plan` counts it, merged like any adapter, refused as a GGUF adapter; and refused
    before training where it cannot run."""
    from safetensors import safe_open

    from launch.plan import planner_targets
    from trainer.plan import count_parameters
    from trainer.plan.trainable import count_trainable

    run_dir = tmp_path / "run"
    experts = ("peft.experts=true", "peft.dropout=0")
    result = _train_briefly(replicas["mixtral"], run_dir, tmp_path / "cache", "optim.lr=1e-2", *experts)
    adapter = json.loads((run_dir / "final" / "adapter_config.json").read_text())
    assert sorted(adapter["target_parameters"]) == ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"]
    params = count_parameters(json.loads((replicas["mixtral"] / "config.json").read_text()))
    planned = count_trainable(params, "lora", r=adapter["r"], target_modules=planner_targets("all-linear", params),
                              experts=True)
    assert f"trainable parameters: {planned.total:,} of" in result.stdout + result.stderr
    with safe_open(str(run_dir / "final" / "adapter_model.safetensors"), "pt") as tensors:
        expert_b = [tensors.get_tensor(k) for k in tensors.keys() if ".experts." in k and "lora_B" in k]
    assert len(expert_b) == 2 * params.num_layers and all(b.abs().sum() > 0 for b in expert_b)  # trained from 0
    _merged_export_equals_the_adapter_on_its_base(replicas["mixtral"], run_dir, tmp_path / "merged")
    gguf = run_cli("export", str(run_dir), "--to", "gguf", "--out", str(tmp_path / "a.gguf"), timeout=300)
    assert_one_line_error(gguf, "target_parameters", "--to gguf-model")
    assert not (tmp_path / "a.gguf").exists()
    for overrides, key in ((("peft.experts=true",), "peft.dropout"),
                           ((*experts, "strategy=fsdp", "launcher.nproc_per_node=2"), "peft.experts")):
        refused = run_cli("train", f"model.path={replicas['mixtral']}", f"data.path={CHAT}",
                          f"run.dir={tmp_path / 'refused'}", *overrides, timeout=300)
        assert_one_line_error(refused, key)
    llama = run_cli("train", f"model.path={replicas['llama-3.1']}", f"data.path={CHAT}",
                    f"run.dir={tmp_path / 'llama'}", *experts, f"paths.cache_dir={tmp_path / 'cache'}",
                    "data.val_ratio=0", "train.micro_batch_size=1", "train.global_batch_size=1", timeout=300)
    assert_one_line_error(llama, "peft.experts", "has no experts")


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILY_LINEARS))
def test_qlora_trains_every_family_and_generate_speaks_its_chat_format(family, replicas, tmp_path):
    run_dir = tmp_path / "run"
    # As a small GPU runs QLoRA: checkpointed layers, their inputs offloaded to host memory; Llama 3.1's 128k-row
    # lm_head in 4 bits too, as torchtune's QLoRA has it, and its input embedding looked up in host memory (a tied
    # head, Llama 3.2's, is refused for both)
    head = ("peft.quantize_lm_head=true", "train.embedding_on_host=true") if family == "llama-3.1" else ()
    trained = _train_briefly(replicas[family], run_dir, tmp_path / "cache", "peft=qlora",
                             "train.gradient_checkpointing=true", "train.activation_offloading=true", *head)
    assert read_summary(run_dir)["status"] == "completed"
    assert "train.activation_offloading: each checkpointed layer's input" in trained.stdout + trained.stderr
    if family == "llama-3.1":
        assert "train.embedding_on_host: the input embedding (" in trained.stdout + trained.stderr
    answer = run_cli("generate", str(run_dir), "Hello there", "--json", "--max-new-tokens", "4", timeout=300)
    assert answer.returncode == 0, answer.stderr[-2000:]
    # Known-harmless third-party notices are silenced (trainer/quiet.py): bitsandbytes' optional hub kernel, and
    # transformers' deprecations of its own internals.
    for output in (trained.stdout + trained.stderr, answer.stderr):
        for notice in ("gemm_4bit_forward", "is_gradient_checkpointing", "past_key_values"):
            assert notice not in output, (notice, output[-3000:])
    record = json.loads(answer.stdout.strip().splitlines()[-1])
    assert TURN_MARKERS[family] in record["input"] and "Hello there" in record["input"]
    if family == "llama-3.2":
        tied = run_cli("train", f"model.path={replicas[family]}", f"data.path={CHAT}", f"run.dir={tmp_path / 'tied'}",
                       "peft=qlora", "peft.quantize_lm_head=true", timeout=300)
        assert_one_line_error(tied, "peft.quantize_lm_head", "tie_word_embeddings")
        tied = run_cli("train", f"model.path={replicas[family]}", f"data.path={CHAT}", f"run.dir={tmp_path / 'tied'}",
                       "peft=qlora", "train.embedding_on_host=true", timeout=300)
        assert_one_line_error(tied, "train.embedding_on_host", "tie_word_embeddings")


@pytest.mark.slow  # tied embeddings, biases, MoE router, soft-capping, fused projections:
@pytest.mark.parametrize("family", list(FAMILY_LINEARS))
def test_full_fine_tuning_resumes_exactly_in_every_family(family, replicas, tmp_path):
    """Full fine-tuning of each replica (every weight trains: tied embeddings, biases, experts, fused projections),
    checkpointed at step 1: resuming from that checkpoint gives step 2's loss bit for bit. The recipe runs in this
    process (the CLI path in front of it is the LoRA test's), to keep nine families cheap."""
    import shutil

    from tests.conftest import compose_config
    from trainer.config.frozen import save_frozen
    from trainer.recipe import run_training

    def train(run_dir):
        config = compose_config(f"model.path={replicas[family]}", f"data.path={CHAT}",
                                f"run.dir={run_dir}", "peft=none", "data.max_seq_len=64", "data.val_ratio=0",
                                "train.max_steps=2", "train.micro_batch_size=1", "train.global_batch_size=1",
                                "checkpoint.every_n_steps=1", "checkpoint.keep_last=0", "eval.max_batches=1",
                                "eval.generate_samples=0", "logger.progress=false", "logger.plot=false",
                                f"paths.cache_dir={tmp_path / 'cache'}")
        save_frozen(config, str(run_dir))
        assert run_training(config) == 0

    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(whole)
    losses = train_losses(whole)
    assert read_summary(whole)["status"] == "completed"
    _every_weight_moved(replicas[family], whole / "final")
    # The same run interrupted after step 1: only its first checkpoint and first logged step survive.
    shutil.copytree(whole, resumed, ignore=shutil.ignore_patterns("step-000002", "final", "summary.json"))
    metrics = resumed / "metrics.jsonl"
    metrics.write_text("".join(line for line in metrics.read_text().splitlines(keepends=True)
                               if json.loads(line).get("step", 0) <= 1))
    train(resumed)
    assert train_losses(resumed)[2] == losses[2]


def _every_weight_moved(base_dir, final_dir):
    """Full fine-tuning trained every tensor of the base (two steps of Adam move each one, norms and biases too)."""
    import torch
    from safetensors import safe_open

    def tensors(directory):
        found = {}
        for path in sorted(directory.glob("*.safetensors")):
            with safe_open(str(path), framework="pt") as fh:
                found.update({name: fh.get_tensor(name).float() for name in fh.keys()})
        return found

    base, final = tensors(base_dir), tensors(final_dir)
    # Names both files share (a tied head is not saved; Mixtral's experts are saved fused, under other names).
    shared = set(base) & set(final)
    assert len(shared) >= 5, (sorted(base)[:5], sorted(final)[:5])
    unchanged = [name for name in shared if torch.equal(base[name], final[name])]
    assert not unchanged, unchanged
