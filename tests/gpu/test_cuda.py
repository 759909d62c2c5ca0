"""What only a CUDA machine can show: bf16 training on the GPU, NCCL ranks, flash attention on packed rows, Liger's
kernels and compiled layers against the plain path, and the planner against `torch.cuda.max_memory_allocated` for a
~1B model. Skipped without a GPU (`pytest -m gpu` on one).

Each test runs the real CLI, as the CPU tests do; only the device differs. Run them, and `make bench`, on a lent
GPU and quote the card with the figures (tests print theirs with `-s`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import read_summary, run_cli, train_losses


def _cuda_devices() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(_cuda_devices() == 0, reason="needs a CUDA GPU")]

QUIET = ("eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false",
         "checkpoint.every_n_steps=0")
# TinyLlama-1.1B's shape with random weights: big enough that the CUDA allocator's peak is the model's, not noise.
LLAMA_1B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 2048,
            "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32, "num_key_value_heads": 4,
            "vocab_size": 32000, "max_position_embeddings": 2048, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
            "torch_dtype": "bfloat16"}
TOLERANCE = 0.15  # issue 8's bound on predicted vs measured peak memory


def test_bf16_lora_on_one_gpu_trains_and_reports_the_cuda_peak(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *QUIET, "train.precision=bf16", "train.max_steps=40",
                     timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    losses, summary = train_losses(run_dir), read_summary(run_dir)
    assert losses[max(losses)] < 0.5 * losses[min(losses)]
    # The allocator's peak, not the process's resident set: the tiny model needs well under 1 GiB on the GPU.
    assert 0 < summary["peak_memory_bytes"] < 2**30
    print(f"\ntiny model, bf16 LoRA, 1 GPU: {summary['tokens_per_second']:,.0f} tokens/s, "
          f"peak {summary['peak_memory_bytes'] / 2**20:.0f} MiB")


@pytest.mark.skipif(_cuda_devices() < 2, reason="needs two CUDA GPUs")
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "zero3"])
def test_two_nccl_ranks_match_one_gpu(strategy, tmp_path):
    common = (*QUIET, "train.precision=bf16", "train.max_steps=6", "train.micro_batch_size=2",
              "train.global_batch_size=8", "peft=none", "optim.lr=2e-4")
    single = run_cli("train", f"run.dir={tmp_path / 'single'}", *common, timeout=900)
    assert single.returncode == 0, single.stderr[-3000:]
    two = run_cli("train", f"run.dir={tmp_path / strategy}", *common, f"strategy={strategy}",
                  "launcher.nproc_per_node=2", timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    expected, losses = train_losses(tmp_path / "single"), train_losses(tmp_path / strategy)
    for step, loss in losses.items():  # bf16: equal to bf16 rounding, not to fp32's 1e-3
        assert loss == pytest.approx(expected[step], rel=2e-2), f"step {step}"


def test_qlora_under_fsdp2_cpu_offload_trains_on_a_gpu_like_without_offload(tmp_path):
    """The 70B-on-2x24GB recipe on one GPU (FSDP2 with one rank): the 4-bit shards live on the host and are gathered
    to the GPU, where their quantisation state stayed; the losses equal FSDP2 without offload (issue 13: proven on
    CPU, here on CUDA)."""
    common = (*QUIET, "train.precision=bf16", "train.max_steps=6", "train.micro_batch_size=2",
              "train.global_batch_size=4", "peft=qlora", "peft.quant_storage=bf16", "peft.dropout=0",
              "strategy=fsdp", "optim.lr=2e-3")
    losses = {}
    for name, extra in (("fsdp", ()), ("offload", ("strategy.cpu_offload=true",))):
        result = run_cli("train", f"run.dir={tmp_path / name}", *common, *extra, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        losses[name] = train_losses(tmp_path / name)
    for step, loss in losses["offload"].items():
        assert loss == pytest.approx(losses["fsdp"][step], rel=1e-3), f"step {step}"


def test_flash_attention_on_packed_rows_matches_sdpa(tmp_path):
    pytest.importorskip("flash_attn", reason="flash-attn is not installed")
    common = (*QUIET, "train.precision=bf16", "train.max_steps=4", "optim.lr=2e-4")
    runs = {}
    for attention in ("sdpa", "flash_attention_2"):
        result = run_cli("train", f"run.dir={tmp_path / attention}", *common,
                         f"model.attn_implementation={attention}", timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[attention] = train_losses(tmp_path / attention)
    # Packed rows: sdpa masks each sample off with a block-diagonal mask, flash attention with varlen boundaries.
    for step, loss in runs["flash_attention_2"].items():
        assert loss == pytest.approx(runs["sdpa"][step], rel=2e-2), f"step {step}"


@pytest.mark.parametrize("option", ["model.kernels=liger", "train.compile=true"])
def test_speed_options_train_to_the_plain_losses_on_a_gpu(option, tmp_path):
    """Liger's RMSNorm/RoPE/SwiGLU kernels and compiled decoder layers against the plain eager path, bf16."""
    if "liger" in option:
        pytest.importorskip("liger_kernel", reason="liger-kernel is not installed (pip install -e '.[kernels]')")
    common = (*QUIET, "train.precision=bf16", "train.max_steps=4", "optim.lr=2e-4", "peft=none")
    runs = {}
    for name, extra in (("plain", ()), ("option", (option,))):
        result = run_cli("train", f"run.dir={tmp_path / name}", *common, *extra, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = train_losses(tmp_path / name)
    for step, loss in runs["option"].items():  # bf16: equal to bf16 rounding
        assert loss == pytest.approx(runs["plain"][step], rel=2e-2), f"step {step}"


@pytest.mark.parametrize(("peft", "option"), [("lora", ""), ("qlora", ""),
                                             ("qlora", "train.activation_offloading=true"),
                                             ("lora", "train.embedding_on_host=true")])
def test_planned_peak_of_a_1b_model_matches_cuda(peft, option, tmp_path):
    """`trainer plan`'s configured total less its margin (the CUDA context and fragmentation, which the allocator's
    peak does not see) against summary.json's torch.cuda.max_memory_allocated, within 15%; with activation
    offloading (the checkpointed layers' inputs in host memory: 21 of 22 layer inputs fewer on the GPU), and with the
    input embedding on the host (its 32,000 x 2,048 bf16 rows, 0.12 GiB, off the GPU). And the total with the margin
    covers what the card really held (summary.json's device_peak_bytes: reserved peak, CUDA context)."""
    model = tmp_path / "llama-1b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(LLAMA_1B))
    overrides = (f"model.path={model}", "model.init=random", "model.tokenizer=${asset:tiny-llama}", f"peft={peft}",
                 "peft.dropout=0", "train.precision=bf16", "train.micro_batch_size=2", "train.global_batch_size=2",
                 "data.max_seq_len=1024", "train.gradient_checkpointing=true", *([option] if option else []))
    plan = run_cli("plan", "--json", *overrides, "hardware.gpu_memory_gb=80", timeout=120)
    assert plan.returncode == 0, plan.stderr
    parts = json.loads(plan.stdout)["configured"]["bytes_per_gpu"]
    predicted = parts["total"] - parts["margin"]
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", *overrides, *QUIET, "train.max_steps=3", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(Path(tmp_path / "run"))
    measured, on_the_card = summary["peak_memory_bytes"], summary["device_peak_bytes"]
    label = f"{peft}{' ' + option if option else ''}"
    print(f"\n1.1B {label}: predicted {predicted / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB "
          f"({predicted / measured - 1:+.1%}); with the margin {parts['total'] / 2**30:.2f} GiB against "
          f"{on_the_card / 2**30:.2f} GiB held on the card (context and fragmentation included)")
    assert predicted == pytest.approx(measured, rel=TOLERANCE)
    assert on_the_card <= parts["total"]  # the margin covers what the allocator's peak does not see
