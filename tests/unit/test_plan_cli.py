"""`trainer plan` through the real CLI: exact totals from a config.json, the 70B answers, speed, one-line errors.

The planner's formulas are tested in test_plan_params.py and test_plan_memory.py; here we check what the command
makes of a composed config (model.path / model.arch, peft, strategy, launcher, hardware) and what it prints.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.unit.test_plan_params import PUBLISHED

CONF_MODEL = REPO / "conf" / "model"
SHARED_MODELS = Path("/work/shared/data/models")
GIB = 1024**3
# The question the issue asks: Llama-3.1-70B LoRA (bf16, seq 4096, micro batch 1, checkpointing) on 80 GB GPUs.
LLAMA_70B = ("experiment=llama-3.1-70b-lora-zero3-2x8", "hardware.gpu_memory_gb=80")


def _conf(name: str) -> dict:
    with (CONF_MODEL / f"{name}.yaml").open(encoding="utf-8") as handle:
        return yaml.safe_load(handle)  # plain YAML: interpolations stay strings


def plan_json(*overrides: str, env: dict | None = None) -> dict:
    result = run_cli("plan", "--json", *overrides, timeout=60, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def fitting(report: dict) -> dict[str, set[str]]:
    """Method label -> the strategies that fit the configured GPUs."""
    fits: dict[str, set[str]] = {}
    for entry in report["entries"]:
        method = fits.setdefault({"none": "full"}.get(entry["peft_method"], entry["peft_method"]), set())
        if entry["fits"]:
            method.add(entry["strategy"])
    return fits


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_config_json_in_model_path_gives_the_published_total(name, tmp_path):
    """The done-when of issue 8: `trainer plan --json model.path=<dir>` with only a config.json in <dir>."""
    (tmp_path / "config.json").write_text(json.dumps(_conf(name)["arch"]))
    report = plan_json(f"model.path={tmp_path}")
    assert report["total_params"] == PUBLISHED[name]
    assert report["arch_source"] == str(tmp_path / "config.json")


@pytest.mark.skipif(not SHARED_MODELS.is_dir(), reason=f"{SHARED_MODELS} (the reference configs) is not here")
def test_shared_model_dirs_give_the_published_total():
    """The real checkpoints' config.json files, reached the way users reach them: model=<entry> with the entry's
    path under TRAINER_MODELS_DIR (the config.json in model.path wins over the entry's model.arch)."""
    checked = []
    for name in sorted(PUBLISHED):
        folder = SHARED_MODELS / Path(_conf(name)["path"]).name
        if not (folder / "config.json").is_file():
            continue
        result = subprocess.run([sys.executable, "-m", "trainer.cli", "plan", "--json", f"model={name}"],
                                capture_output=True, text=True, timeout=60, cwd=REPO,
                                env={**os.environ, "TRAINER_MODELS_DIR": str(SHARED_MODELS)})
        assert result.returncode == 0, result.stderr
        report = json.loads(result.stdout)
        assert report["arch_source"] == str(folder / "config.json"), name
        assert report["total_params"] == PUBLISHED[name], name
        checked.append(name)
    assert checked, "no shared model folder matched a conf/model entry"


@pytest.mark.parametrize("nodes", [1, 2])
def test_llama_70b_on_8_and_16_gpus_of_80gb(nodes):
    """Which of full / LoRA / QLoRA fit Llama-3.1-70B on 1 or 2 nodes of 8 x 80 GB, and how fast the answer comes.

    bf16, seq 4096, micro batch 1, checkpointing on (the 70B experiment). Full fine-tuning needs offload (ZeRO-3 or
    FSDP2) on both (FSDP needs 156/88 GiB per GPU: 24 GPUs); LoRA fits sharded (fsdp, zero3) from 4 GPUs;
    QLoRA fits everywhere, even one GPU, except under ZeRO-3's parameter offload. Measured on the 2-core dev
    machine: 0.4-0.8 s per command when quiet, 1.3-1.6 s at load
    7 (the issue asks < 2 s; the bound here is generous because the machine is shared).
    """
    started = time.monotonic()
    report = plan_json(*LLAMA_70B, f"launcher.nnodes={nodes}")
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"trainer plan took {elapsed:.1f} s"
    assert report["total_params"] == PUBLISHED["llama-3.1-70b"]
    assert (report["nodes"], report["gpus_per_node"]) == (nodes, 8)
    fits = fitting(report)
    assert fits["full"] == {"zero3_offload", "fsdp_offload"}
    assert fits["lora"] == {"fsdp", "zero3", "zero3_offload", "fsdp_offload"}
    # DeepSpeed cannot offload 4-bit weights (trainer/config/feasibility.py): not offered for QLoRA
    assert fits["qlora"] == {"single", "ddp", "fsdp", "zero1", "zero2", "zero3", "fsdp_offload"}
    assert report["recommendation"] == {"strategy": "zero3", "peft_method": "lora"}  # the experiment's own choice
    assert report["configured"]["fits"] and report["configured"]["world_size"] == 8 * nodes
    by_strategy = report["bytes_per_gpu_by_strategy"]
    assert by_strategy["fsdp"]["full"] > 80 * GIB > by_strategy["zero3"]["lora"]
    # Twice the GPUs halve the sharded model states: full fine-tuning under fsdp drops from ~156 to ~88 GiB.
    assert by_strategy["fsdp"]["full"] / GIB == pytest.approx(155.7 if nodes == 1 else 88.3, abs=0.5)


def test_the_issue_command_is_fast_and_imports_no_torch():
    """`trainer plan model=llama-3.1-70b hardware.gpu_memory_gb=80 launcher.nproc_per_node=8` answers without
    importing torch (or transformers, peft, deepspeed); the time covers the whole Python process."""
    code = ("import sys; from trainer.cli import main; rc = main(['plan', 'model=llama-3.1-70b', "
            "'hardware.gpu_memory_gb=80', 'launcher.nproc_per_node=8']); heavy = [m for m in ('torch', "
            "'transformers', 'peft', 'deepspeed') if m in sys.modules]; print('RESULT', rc, heavy)")
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    elapsed = time.monotonic() - started
    assert out.stdout.strip().splitlines()[-1] == "RESULT 0 []", out.stdout + out.stderr
    assert "recommendation:" in out.stdout and "what fits on 1 node(s) x 8 GPU(s)" in out.stdout
    assert elapsed < 10, f"{elapsed:.1f} s"


REAL_SCALE_EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml")
                                if "\nhardware:" in p.read_text(encoding="utf-8"))


def test_every_real_scale_experiment_names_its_hardware():
    assert len(REAL_SCALE_EXPERIMENTS) >= 7, REAL_SCALE_EXPERIMENTS  # the six of the strategies issue + 8B QLoRA


@pytest.mark.parametrize("experiment", REAL_SCALE_EXPERIMENTS)
def test_each_shipped_experiment_fits_the_hardware_it_names(experiment):
    """A shipped experiment that the planner says runs out of memory would cost its user a queue wait."""
    report = plan_json(f"experiment={experiment}")
    configured = report["configured"]
    assert configured["fits"], (experiment, configured["bytes_per_gpu"]["total"] / GIB, report["gpu_memory_gib"])


def test_single_gpu_qlora_experiment_is_one_24gb_card():
    report = plan_json("experiment=llama-3.1-8b-qlora-1gpu")
    configured = report["configured"]
    assert (configured["strategy"], configured["peft_method"], configured["world_size"]) == ("single", "qlora", 1)
    assert report["gpu_memory_gib"] == 24
    # Full fine-tuning does not fit that card. Since the chunked loss (one chunk of logits instead of 6.9 GiB) LoRA on
    # a bf16 base fits too (20.7 GiB), but with little room; QLoRA needs half of it (10.1 GiB).
    single = report["bytes_per_gpu_by_strategy"]["single"]
    assert single["full"] > 24 * GIB > single["lora"] > 2 * single["qlora"]


def test_text_output_breaks_down_the_configured_run():
    result = run_cli("plan", *LLAMA_70B, "launcher.nnodes=1", timeout=60)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "configured run: zero3 + lora on 1 node(s) x 8 GPU(s) of 80 GiB" in out
    for part in ("weights", "gradients", "optimizer", "gathered", "activations", "logits", "margin", "total"):
        assert f"  {part} " in out, part
    assert "70,553,706,496 parameters" in out and "recommendation: zero3 + lora" in out


def test_single_strategy_on_several_processes_is_planned_with_a_note():
    report = plan_json("model=llama-3.1-8b", "launcher.nproc_per_node=4", "hardware.gpu_memory_gb=24")
    assert report["configured"]["strategy"] == "single" and report["configured"]["world_size"] == 1
    assert any("strategy=single runs one process" in note for note in report["notes"])
    assert report["gpus_per_node"] == 4


def test_config_values_reach_the_planner():
    """peft, precision, micro batch, sequence length, checkpointing, strategy and launcher all come from the config."""
    base = plan_json("model=llama-3.1-8b", "hardware.gpu_memory_gb=80", "train.precision=bf16", "peft=none",
                     "strategy=fsdp", "launcher.nproc_per_node=8", "train.micro_batch_size=1", "data.max_seq_len=2048")
    configured = base["configured"]
    assert configured["strategy"] == "fsdp" and configured["peft_method"] == "none" and configured["world_size"] == 8
    assert configured["trainable_params"] == PUBLISHED["llama-3.1-8b"]
    longer = plan_json("model=llama-3.1-8b", "hardware.gpu_memory_gb=80", "train.precision=bf16", "peft=none",
                       "strategy=fsdp", "launcher.nproc_per_node=8", "train.micro_batch_size=1",
                       "data.max_seq_len=4096", "train.gradient_checkpointing=true")
    # the chunked loss keeps one chunk of logits whatever the sequence; unchunked they grow with it
    assert longer["configured"]["bytes_per_gpu"]["logits"] == configured["bytes_per_gpu"]["logits"]
    unchunked = plan_json("model=llama-3.1-8b", "hardware.gpu_memory_gb=80", "train.precision=bf16", "peft=none",
                          "strategy=fsdp", "launcher.nproc_per_node=8", "train.micro_batch_size=1",
                          "data.max_seq_len=2048", "objective.chunk_tokens=0")
    assert unchunked["configured"]["bytes_per_gpu"]["logits"] == 2048 // 256 * configured["bytes_per_gpu"]["logits"]
    assert longer["configured"]["bytes_per_gpu"]["activations"] < configured["bytes_per_gpu"]["activations"]
    lora = plan_json("model=llama-3.1-8b", "peft.r=8", "peft.target_modules=[q_proj,v_proj]")
    assert lora["configured"]["trainable_params"] == 32 * 8 * (2 * 4096 + 4096 + 1024)
    offload = plan_json("model=llama-3.1-8b", "strategy=zero3_offload", "launcher.nproc_per_node=2",
                        "hardware.host_memory_gb=64")
    assert offload["configured"]["strategy"] == "zero3_offload" and offload["host_memory_gib"] == 64


@pytest.mark.skipif(not (REPO / "conf" / "peft" / "qlora.yaml").is_file(), reason="peft=qlora comes with issue 6")
def test_qlora_settings_and_target_presets_reach_the_planner():
    nf4 = plan_json("model=llama-3.1-8b", "peft=qlora", "train.precision=bf16")["configured"]
    fp4_single_quant = plan_json("model=llama-3.1-8b", "peft=qlora", "train.precision=bf16", "peft.quant_type=fp4",
                                 "peft.double_quant=false")["configured"]
    assert nf4["peft_method"] == "qlora" and nf4["trainable_params"] == 41_943_040
    # double quantisation stores one 8-bit absmax per 64 weights instead of an fp32 one: ~0.047 bytes per weight less
    saved = fp4_single_quant["bytes_per_gpu"]["weights"] - nf4["bytes_per_gpu"]["weights"]
    assert saved == pytest.approx(0.047 * 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336), rel=0.02)
    attention = plan_json("model=llama-3.1-8b", "peft.target_modules=attention")["configured"]
    mlp = plan_json("model=llama-3.1-8b", "peft.target_modules=mlp")["configured"]
    assert attention["trainable_params"] == 32 * 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))
    assert mlp["trainable_params"] == 32 * 16 * 3 * (4096 + 14336)


def test_arch_fields_of_a_conf_entry_can_be_overridden():
    """Without a config.json in model.path, the entry's model.arch is read, overrides included."""
    report = plan_json("model=llama-3.1-8b", "model.path=null", "model.init=random", "model.arch.num_hidden_layers=2")
    assert report["arch_source"] == "model.arch of llama-3.1-8b"
    per_layer = 4096 * (4096 + 2 * 1024 + 4096) + 3 * 4096 * 14336 + 2 * 4096
    assert report["total_params"] == 2 * 128256 * 4096 + 2 * per_layer + 4096


def test_a_whole_architecture_can_be_given_on_the_command_line():
    arch = ("+model.arch={model_type: llama, hidden_size: 64, intermediate_size: 128, num_hidden_layers: 2, "
            "num_attention_heads: 4, num_key_value_heads: 2, vocab_size: 1000}")
    report = plan_json("model.path=null", "model.init=random", arch)
    per_layer = 64 * (64 + 2 * 32 + 64) + 3 * 64 * 128 + 2 * 64  # GQA: k/v project to 2 heads of 16
    assert report["total_params"] == 2 * 1000 * 64 + 2 * per_layer + 64  # untied embeddings + final norm


@pytest.mark.parametrize(("override", "fragments"), [
    ("optim.lr=fast", ["optim.lr", "'fast'"]),
    ("no_such_key=1", ["no_such_key", "unknown key"]),
    ("model.path=/no/such/dir", ["model.path", "/no/such/dir", "config.json"]),
    ("peft.target_modules=[foo]", ["peft.target_modules", "foo", "q_proj"]),
    ("hardware.gpu_memory_gb=0", ["hardware.gpu_memory_gb", "> 0"]),
    ("hardware.gpu_memory_gb=big", ["hardware.gpu_memory_gb"]),
    ("strategy=nope", ["strategy/nope", "fsdp"]),
    ("--verbose", ["unknown option", "--verbose"]),
    # tiny-llama's arch is empty: a key that is new there needs Hydra's '+', and the message says how.
    ("model.arch={hidden_size:64}", ["model.arch.hidden_size", "+model.arch.hidden_size=VALUE"]),
])
def test_bad_overrides_exit_2_with_one_line(override, fragments):
    assert_one_line_error(run_cli("plan", override, timeout=60), *fragments)


def test_missing_arch_field_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 10}))
    assert_one_line_error(run_cli("plan", f"model.path={tmp_path}", timeout=60), "model.path", "hidden_size")


def test_help_lists_plan():
    result = run_cli("--help", timeout=60)
    assert "plan [OVERRIDES]" in result.stdout
    assert "--to gguf|gguf-model" in result.stdout and "--to hf|adapter|merged" in result.stdout  # every export target
    result = run_cli("plan", "--help", timeout=60)
    assert result.returncode == 0 and "--json" in result.stdout


def test_a_run_that_does_not_fit_is_shown_the_cheap_knobs_first_with_their_figures():
    """Llama-3.1-8B LoRA on one 24 GB GPU, micro batch 4 x 2048 tokens, checkpointing and the chunked loss off: no
    single knob is enough, all of the job-keeping ones together are; each figure is the planner's own."""
    overrides = ("model=llama-3.1-8b", "peft=lora", "hardware.gpu_memory_gb=24", "train.micro_batch_size=4",
                 "data.max_seq_len=2048", "train.gradient_checkpointing=false", "objective.chunk_tokens=0",
                 "train.global_batch_size=32")
    report = plan_json(*overrides)
    assert not report["configured"]["fits"]
    knobs = {" ".join(k["overrides"]): k for k in report["configured"]["cheap_knobs"]}
    alone = ("train.gradient_checkpointing=true", "train.gradient_checkpointing=true train.activation_offloading=true",
             "train.embedding_on_host=true", "objective.chunk_tokens=256", "train.micro_batch_size=1",
             "optim=adamw_8bit")
    assert all(key in knobs and not knobs[key]["fits"] for key in alone), list(knobs)
    together = knobs["train.gradient_checkpointing=true train.activation_offloading=true train.embedding_on_host=true "
                     "objective.chunk_tokens=256 train.micro_batch_size=1 optim=adamw_8bit"]
    assert together["fits"] and not together["changes_the_job"]
    assert knobs["data.max_seq_len=1024"]["changes_the_job"]
    total = report["configured"]["bytes_per_gpu"]["total"]
    assert all(k["bytes_per_gpu"] < total for k in knobs.values())
    # The same figures as planning the knob directly
    direct = plan_json(*overrides, "train.gradient_checkpointing=true")
    assert direct["configured"]["bytes_per_gpu"]["total"] == knobs["train.gradient_checkpointing=true"]["bytes_per_gpu"]
    text = run_cli("plan", *overrides, timeout=60).stdout
    assert text.index("cheap knobs first") < text.index("what fits on")


@pytest.mark.parametrize("strategy", ["single", "zero2", "fsdp"])
def test_every_cheap_knob_the_plan_shows_is_a_setting_train_accepts(strategy):
    from tests.conftest import compose_config
    from trainer.config.validate import check_peft_optim_strategy

    overrides = ("model=llama-3.1-70b", "peft=lora", f"strategy={strategy}", "hardware.gpu_memory_gb=80",
                 "train.gradient_checkpointing=false", "objective.chunk_tokens=0", "train.micro_batch_size=2",
                 "train.global_batch_size=16", f"launcher.nproc_per_node={1 if strategy == 'single' else 8}")
    knobs = plan_json(*overrides)["configured"]["cheap_knobs"]
    assert knobs
    for knob in knobs:
        config = compose_config(*overrides, *knob["overrides"], "model.path=null", "model.init=random")
        check_peft_optim_strategy(config)


def test_a_preference_objective_is_planned_as_two_rows_per_pair_without_a_reference_model():
    """docs/preference.md: a micro batch of m pairs is 2m rows (activations and logits double), and no second
    model is held (the weights stay those of SFT): its log-probs are computed once before step 1. The logits term
    stays: the chunked loss holds one chunk of logits however many rows there are."""
    common = ("model=llama-3.1-8b", "peft=lora", "data.max_seq_len=2048", "train.micro_batch_size=1",
              "train.gradient_checkpointing=true", "hardware.gpu_memory_gb=80")
    sft = plan_json(*common)["configured"]["bytes_per_gpu"]
    report = plan_json(*common, "objective.name=dpo")
    dpo = report["configured"]["bytes_per_gpu"]
    assert dpo["activations"] == 2 * sft["activations"] and dpo["logits"] == sft["logits"]
    assert dpo["weights"] == sft["weights"] and dpo["optimizer"] == sft["optimizer"]
    assert any("2 rows, planned as such; no reference model is held" in note for note in report["notes"]), report


def test_regularize_anchor_is_counted_per_gpu():
    """L2 keeps the starting weights (one fp32 copy of the trainable weights), EWC their Fisher diagonal too: both
    whole on the GPU, as trainer/regularize.py holds them."""
    model = ("model=llama-3.1-8b", "hardware.gpu_memory_gb=80", "peft=none", "strategy=single")
    replay = str(REPO / "trainer" / "assets" / "demo-facts" / "replay.txt")
    plain = plan_json(*model)["configured"]
    l2 = plan_json(*model, "regularize.l2_lambda=1")["configured"]
    ewc = plan_json(*model, "regularize.ewc_lambda=100", f"regularize.fisher_path={replay}")["configured"]
    trainable = 8_030_261_248  # Llama-3.1-8B, all of it in a full fine-tune
    assert plain["bytes_per_gpu"]["anchor"] == 0
    assert l2["bytes_per_gpu"]["anchor"] == 4 * trainable
    assert ewc["bytes_per_gpu"]["anchor"] == 8 * trainable
    # the margin is a fraction of everything else, so the total grows by a little more than the anchor
    assert ewc["bytes_per_gpu"]["total"] - plain["bytes_per_gpu"]["total"] >= 8 * trainable


def test_deepspeeds_reduce_bucket_is_planned_as_configured():
    """The margin's DeepSpeed reduce bucket follows strategy.deepspeed_overrides' reduce_bucket_size and doubles with
    overlap_comm under ZeRO-2 (two buffers); a size DeepSpeed cannot take is named."""
    base = ("model=llama-3.1-8b", "peft=lora", "strategy=zero2", "launcher.nproc_per_node=2",
            "hardware.gpu_memory_gb=80")

    def margin(*extra):
        return plan_json(*base, *extra)["configured"]["bytes_per_gpu"]["margin"]

    default = margin()
    assert margin("+strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size=1e7") == default - 490_000_000 * 2
    assert margin("strategy.overlap_comm=true") == default + 500_000_000 * 2
    for bad in ("auto", "-1"):
        refused = run_cli("plan", *base, f"+strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size={bad}",
                          timeout=60)
        assert_one_line_error(refused, "strategy.deepspeed_overrides.zero_optimization.reduce_bucket_size", "5e8")
