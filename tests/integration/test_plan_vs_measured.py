"""`trainer plan`'s prediction against what training on the embedded tiny model really holds, within 15%.

Every case runs the tiny Llama (3.4M parameters) in bf16 mixed precision, micro batch 8 x rows of up to 256 tokens
(packed demo data), no activation checkpointing, AdamW, one micro batch per step. The prediction is what
`trainer plan --json` prints for the same overrides: its "configured" entry. Two comparisons per case:

1. Model states, through the real CLI (`trainer train`, one step): summary.json's `model_state_bytes_per_rank`
   (parameters as stored, fp32 gradients or DeepSpeed's gradient partitions, optimizer state and fp32 master
   partitions, on rank 0) against the planner's weights + master weights + gradients + optimizer, less the bf16
   copies that torch.autocast makes of trainable weights (single/ddp), which live only during the step and are
   measured in 2. These are exact layouts: agreement is expected to well under 1%; the test allows 2%.

2. Peak memory of a training step, measured with tracked allocations (tests/integration/plan_probe.py runs the real
   Recipe of the frozen config): tensors alive before the second step plus the highest running total of torch's
   allocation events during it. This is the CPU analogue of `torch.cuda.max_memory_allocated`; the process's
   resident set (summary.json's `peak_memory_bytes`, ~700 MB here) is mostly the Python/torch runtime and is not
   compared. The prediction is the planner's total per GPU less its margin (10% of a step's transient allocations for
   fragmentation, plus the CUDA context, NCCL buffers and DeepSpeed's reduce bucket), within the issue's 15%. For
   ZeRO-3, DeepSpeed's gradient reduce bucket (`reduce_bucket_size`, 5e8 elements: 1 GB in bf16, sized by
   DeepSpeed's config and not by the model; the planner counts it in its margin) is taken off the measurement.

Figures (torch 2.13 CPU, 2-core machine; predicted / measured MB, deviation of the prediction):
    states: single/full 54.8/54.8, single/LoRA 11.6/11.6, fsdp/full 27.4/27.4, zero3/full 27.4/27.4 (all < 0.01%),
            single/QLoRA 8.33/8.29 (+0.6%: the NF4 block scales are not parameters, so summary.json misses them)
    peak:   single/full 208.6/202.4 (+3.1%), single/LoRA 145.2/149.6 (-2.9%), single/QLoRA 175.8/180.9 (-2.8%),
            fsdp/full 157.7/153.3 (+2.9%), zero3/full 157.7/167.0 (-5.5%), single/QLoRA built directly 175.8/173.1
    since the chunked loss and QLoRA's bf16 remainder (docs/memory-planning.md, section 7):
            single/full 182.9/181.3, single/LoRA 120.1/134.3 (-10.6%), single/QLoRA 115.7/130.0 (-10.9%: with the
            logits down to one chunk, the peak moves into the backward of the unchecked layers, whose gradient
            tensors the planner leaves to its margin), direct QLoRA (peft recipe) 171.6/173.2, replica-128k LoRA
            431.7/432.3, unchunked 825.7/823.2, QLoRA 431.6/432.2; zero3/full 153.5/162.8 (-5.7%: ZeRO-3 runs the
            loss unchunked, lm_head being partitioned between the forward and the chunks' recomputation)
    since only labelled positions reach lm_head (docs/performance.md), the replica cases train on their prompts too
            (data.train_on_inputs=true), so that a micro batch has at least one chunk of label tokens
What the planner leaves out here: the packed rows' attention mask, which SDPA converts to a bf16 bias in every
layer and keeps for backward (b*s*s*2 bytes per layer: 4.1 MB); under ZeRO-3, parameters below
stage3_param_persistence_threshold kept whole on every rank (1.6 MB: the tiny model's attention weights) and a
prefetch bucket that holds the whole tiny model. What it over-counts: gradients, counted whole although the peak
comes at the loss before any weight gradient exists (with gradient accumulation they do exist).

LoRA runs with peft.dropout=0: CPU dropout keeps an fp32 mask per adapter input where CUDA keeps one byte (the
per-layer tests in tests/unit/test_plan_memory.py check both). test_qlora_step_measured_directly also builds QLoRA
the way trainer/model.py does, with transformers, peft and bitsandbytes, outside the trainer. On a GPU,
tests/gpu/test_cuda.py compares the plan with torch.cuda.max_memory_allocated for a 1.1B model.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, read_summary, run_cli

pytestmark = pytest.mark.slow

TOLERANCE = 0.15  # the bound on predicted vs measured peak memory
STATE_TOLERANCE = 0.02  # model states are exact layouts: anything above this is a modelling error
TINY = REPO / "trainer" / "assets" / "tiny-llama"
MICRO_BATCH, SEQ_LEN = 8, 256
COMMON = ("train.precision=bf16", f"data.max_seq_len={SEQ_LEN}", "train.gradient_checkpointing=false")
QUICK_RUN = ("train.max_steps=1", "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false",
             "logger.plot=false", "checkpoint.every_n_steps=0")
# A shrunken Llama-3.1 with its real 128,256-token vocabulary (trainer/replicas.py: 2 layers of width 64), where the
# logits are most of a step: unchunked, 12 bytes per logit x 512 tokens x 128k = 0.8 GB against 0.1 GB for the rest.
REPLICA_MICRO_BATCH = 2
# name -> (ranks, overrides); the replica cases read their model from the `replica` fixture
CASES = {
    "single/full": (1, ("strategy=single", "peft=none")),
    "single/lora": (1, ("strategy=single", "peft=lora", "peft.dropout=0")),
    "single/qlora": (1, ("strategy=single", "peft=qlora", "peft.dropout=0")),
    "fsdp/full": (2, ("strategy=fsdp", "peft=none")),
    "zero3/full": (2, ("strategy=zero3", "peft=none")),
    "replica-128k/lora": (1, ("strategy=single", "peft=lora", "peft.dropout=0")),
    "replica-128k/lora-unchunked": (1, ("strategy=single", "peft=lora", "peft.dropout=0", "objective.chunk_tokens=0")),
    "replica-128k/qlora": (1, ("strategy=single", "peft=qlora", "peft.dropout=0")),
    # the 128k x 64 lm_head in 4 bits too (peft.quantize_lm_head)
    "replica-128k/qlora-4bit-head": (1, ("strategy=single", "peft=qlora", "peft.dropout=0",
                                         "peft.quantize_lm_head=true")),
}


@pytest.fixture(scope="module")
def replica(tmp_path_factory) -> Path:
    from trainer.replicas import build_replica

    return build_replica("llama-3.1", tmp_path_factory.mktemp("replica") / "llama-3.1")


def case_params(extended: tuple[str, ...] = ()):
    """Every case; those in `extended` run under `make test-all` only (`make test` keeps one of each kind)."""
    for name, (ranks, _) in CASES.items():
        marks = [pytest.mark.distributed] if ranks > 1 else []
        marks += [pytest.mark.extended] if name in extended else []
        yield pytest.param(name, marks=marks, id=name.replace("/", "-"))


def micro_batch_of(name: str) -> int:
    return REPLICA_MICRO_BATCH if name.startswith("replica") else MICRO_BATCH


def overrides_of(name: str, replica: Path | None = None) -> tuple[str, ...]:
    ranks, overrides = CASES[name]
    micro_batch = micro_batch_of(name)
    # Every position labelled (prompts trained on too): the plan's one-chunk logits term is an upper bound, reached
    # when a micro batch has at least objective.chunk_tokens label tokens; with the prompts masked out, the replica's
    # 2 x 256 packed tokens of demo data have fewer, and only those positions reach lm_head.
    model = (f"model.path={replica}", "data.train_on_inputs=true") if name.startswith("replica") else ()
    global_batch = micro_batch * ranks  # one micro batch per rank and step
    return (*overrides, *model, *COMMON, f"train.micro_batch_size={micro_batch}", f"launcher.nproc_per_node={ranks}",
            f"train.global_batch_size={global_batch}")


def predicted(name: str, replica: Path | None = None) -> dict:
    """`trainer plan --json` for the case's overrides: the configured run's estimate."""
    result = run_cli("plan", "--json", *overrides_of(name, replica), "hardware.gpu_memory_gb=80", timeout=60)
    assert result.returncode == 0, result.stderr
    configured = json.loads(result.stdout)["configured"]
    assert configured["world_size"] == CASES[name][0]
    return configured


def planned_states(configured: dict) -> int:
    """Planner's persistent model states per GPU: without the autocast copies of trainable weights (single/ddp)."""
    parts = configured["bytes_per_gpu"]
    autocast_copy = 2 * configured["trainable_params"] if configured["strategy"] in ("single", "ddp") else 0
    return parts["weights"] - autocast_copy + parts["master_weights"] + parts["gradients"] + parts["optimizer"]


def deviation(prediction: float, measurement: float) -> str:
    change = prediction / measurement - 1
    return f"predicted {prediction / 1e6:.1f} MB, measured {measurement / 1e6:.1f} MB ({change:+.1%})"


# `make test` compares states on one process (the sharded layouts are checked in the peak test's live_before too).
@pytest.mark.parametrize("name", list(case_params(extended=("single/qlora", "replica-128k/lora-unchunked",
                                                             "replica-128k/qlora", "fsdp/full", "zero3/full",
                                                             "replica-128k/lora", "replica-128k/qlora-4bit-head"))))
def test_model_states_match_the_cli_summary(name, tmp_path, request):
    """Comparison 1 (module docstring): summary.json's per-rank model states against the planner's."""
    ranks, _ = CASES[name]
    replica = request.getfixturevalue("replica") if name.startswith("replica") else None
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", *overrides_of(name, replica), *QUICK_RUN, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    summary = read_summary(tmp_path / "run")
    assert summary["world_size"] == ranks
    measured = sum(summary["model_state_bytes_per_rank"].values())
    prediction = planned_states(predicted(name, replica))
    print(f"{name} states: {deviation(prediction, measured)}")
    assert prediction == pytest.approx(measured, rel=STATE_TOLERANCE), deviation(prediction, measured)


def run_probe(run_dir: Path, overrides: tuple[str, ...], ranks: int) -> list[dict]:
    """Freeze the config as `trainer train` would, then measure one step per rank with plan_probe."""
    from launch.local import worker_environment
    from tests.conftest import compose_config
    from trainer.config.frozen import save_frozen

    save_frozen(compose_config(f"run.dir={run_dir}", *overrides, "logger.progress=false"), str(run_dir))
    probe = ["-m", "tests.integration.plan_probe", str(run_dir)]
    if ranks > 1:
        probe = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *probe]
    result = subprocess.run([sys.executable, *probe], capture_output=True, text=True, timeout=900, cwd=REPO,
                            env=worker_environment())
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return [json.loads((run_dir / f"probe-rank{rank}.json").read_text()) for rank in range(ranks)]


@pytest.mark.parametrize("name", list(case_params(extended=("replica-128k/qlora", "replica-128k/lora-unchunked",
                                                             "replica-128k/qlora-4bit-head"))))
def test_step_peak_matches_the_plan(name, tmp_path, request):
    """Comparison 2 (module docstring): the tracked-allocation peak of a real training step, on every rank."""
    replica = request.getfixturevalue("replica") if name.startswith("replica") else None
    configured = predicted(name, replica)
    prediction = configured["bytes_per_gpu"]["total"] - configured["bytes_per_gpu"]["margin"]
    if name.endswith("unchunked"):  # the case is there for the logits: unchunked they are most of the step
        assert configured["bytes_per_gpu"]["logits"] / prediction > 0.5
    for rank in run_probe(tmp_path / "run", overrides_of(name, replica), CASES[name][0]):
        (batch, seq_len), = rank["batch_shapes"]
        assert batch == micro_batch_of(name) and 0.9 * SEQ_LEN <= seq_len <= SEQ_LEN  # packed rows: nearly full
        bucket = 2 * rank["deepspeed_reduce_bucket_elements"]  # bf16
        measured = rank["peak"] - bucket
        # What is alive before the step is the model state (and DeepSpeed's bucket): nothing else leaks in. ZeRO-3
        # also keeps parameters under stage3_param_persistence_threshold (1e5 elements) whole on every rank: here
        # the q/k/v/o weights, 1.6 MB; in a large model only norms and biases.
        states = sum(rank["state_bytes"].values()) - _grads_freed_between_steps(name, rank)
        assert rank["live_before"] - bucket == pytest.approx(states, rel=0.1)
        print(f"{name} rank {rank['rank']} peak: {deviation(prediction, measured)}")
        assert prediction == pytest.approx(measured, rel=TOLERANCE), deviation(prediction, measured)


def _grads_freed_between_steps(name: str, rank: dict) -> int:
    """local_state_bytes counts fp32 gradients, which torch strategies free after each step (zero_grad to None);
    DeepSpeed keeps its gradient partitions allocated."""
    return 0 if name.startswith("zero") else rank["state_bytes"]["grads"]


@pytest.mark.filterwarnings("ignore")
def test_qlora_step_measured_directly(tmp_path):
    """single/QLoRA without the trainer, built the usual Hugging Face way: the tiny model loaded in NF4 (double
    quantisation) by bitsandbytes on CPU, peft's prepare_model_for_kbit_training (unquantised weights to fp32), LoRA
    r=16 on all linear layers (fp32 adapters, dropout 0), AdamW, one bf16-autocast step on a batch of 8 x 256 tokens
    with the unchunked loss, measured as in comparison 2 against `trainer.plan` for single + qlora planned as that
    recipe (upcast_unquantized, loss_chunk_tokens=0). It checks the planner's model of QLoRA without the trainer's
    own loading code in between (and of the baseline benchmarks/memory.py compares with)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from tests.integration.plan_probe import measure_step
    from trainer.evaluate import token_loss_sum
    from trainer.plan import PlanInputs, estimate_memory, load_arch

    quantization = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_use_double_quant=True,
                                                   bnb_4bit_compute_dtype=torch.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(TINY, quantization_config=quantization,
                                                              dtype=torch.bfloat16, device_map="cpu")
    model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                       target_modules="all-linear", task_type="CAUSAL_LM"))
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    torch.manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (MICRO_BATCH, SEQ_LEN))

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(input_ids=input_ids).logits
        (token_loss_sum(logits, input_ids) / input_ids.numel()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    measured = measure_step(step)["peak"]
    estimate = estimate_memory(PlanInputs(load_arch(TINY), peft_method="qlora", lora_r=16, precision="bf16",
                                          micro_batch_size=MICRO_BATCH, seq_len=SEQ_LEN, gradient_checkpointing=False,
                                          upcast_unquantized=True, loss_chunk_tokens=0))
    assert estimate.trainable.total == sum(p.numel() for p in trainable)
    prediction = estimate.total - estimate.margin
    print(f"single/qlora (direct) peak: {deviation(prediction, measured)}")
    assert prediction == pytest.approx(measured, rel=TOLERANCE), deviation(prediction, measured)
