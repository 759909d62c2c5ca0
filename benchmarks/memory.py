"""Peak memory of one QLoRA and one LoRA step on a 128k-vocabulary model: ours against the usual Hugging Face recipe.

    python benchmarks/memory.py [--seq-len 512] [--micro-batch 2]

The model is a shrunken Llama-3.1 with its real 128,256-token vocabulary (trainer/replicas.py: 2 layers of width 64,
random weights), where the logits and the embeddings are what a step's memory is made of. Both sides train the same
step shape: micro batch x sequence tokens, bf16 autocast, LoRA r=16 on all linear layers (dropout 0), AdamW,
activation checkpointing, and each side's peak is measured the same way in a process of its own:

* ours: `trainer train`'s own path (compose -> freeze -> the real Recipe of tests/integration/plan_probe.py), on
  the demo data packed into rows of the sequence length;
* Hugging Face: AutoModelForCausalLM (+ BitsAndBytesConfig NF4 with double quantisation for QLoRA, then peft's
  prepare_model_for_kbit_training), get_peft_model, and transformers' Trainer on random tokens of the same shape.

Peak = tensors alive before the measured (second) step + the highest running total of allocations during it: torch
profiler's allocation events on CPU (plan_probe.measure_step), torch.cuda.max_memory_allocated on a GPU. Beside each
side, the planner's prediction for it (total less its margin): ours as `trainer plan` plans the configured run, the
Hugging Face recipe as PlanInputs(upcast_unquantized=True, loss_chunk_tokens=0). Last, the chunked loss against the
unchunked one on the same fp32 model and batch.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import REPO, table  # noqa: E402

LORA = {"r": 16, "alpha": 32}
MB = 1e6


def our_overrides(replica: Path, peft: str, seq_len: int, micro_batch: int) -> list[str]:
    return [f"model.path={replica}", f"peft={peft}", "peft.dropout=0", "strategy=single", "train.precision=bf16",
            f"train.micro_batch_size={micro_batch}", f"train.global_batch_size={micro_batch}",
            f"data.max_seq_len={seq_len}", "train.gradient_checkpointing=true", "logger.progress=false"]


def measure_ours(run_dir: Path, overrides: list[str]) -> dict:
    """The real Recipe of the frozen config, measured by tests/integration/plan_probe.py in its own process."""
    from launch.compose import compose_train_config
    from trainer.config.frozen import save_frozen
    from trainer.config.validate import to_config

    save_frozen(to_config(compose_train_config([f"run.dir={run_dir}", *overrides])), str(run_dir))
    run([sys.executable, "-m", "tests.integration.plan_probe", str(run_dir)])
    return json.loads((run_dir / "probe-rank0.json").read_text())


def run(command: list[str]) -> None:
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{result.stdout[-2000:]}{result.stderr[-4000:]}")


def hf_step(replica: str, peft_method: str, seq_len: int, micro_batch: int, out: str) -> None:
    """The Hugging Face recipe (runs in its own process): the peak of its second optimizer step."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    from tests.integration.plan_probe import allocation_peak, live_tensor_bytes

    extra = {}
    if peft_method == "qlora":
        extra["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    cuda = torch.cuda.is_available()
    model = transformers.AutoModelForCausalLM.from_pretrained(replica, dtype=torch.bfloat16,
                                                              device_map="cuda" if cuda else "cpu", **extra)
    model.config.use_cache = False
    if peft_method == "qlora":
        model = prepare_model_for_kbit_training(model)  # the usual recipe: fp32 remainder, checkpointing on
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0,
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    rows = []
    for _ in range(4 * micro_batch):
        ids = torch.randint(4, model.config.vocab_size, (seq_len,))
        labels = ids.clone()
        labels[:seq_len // 4] = -100  # a prompt
        rows.append({"input_ids": ids, "labels": labels})
    result = {}

    class Measure(transformers.TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 1:  # the second step: optimizer state exists
                result["live_before"] = live_tensor_bytes()
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                    result["allocated_before"] = torch.cuda.memory_allocated()
                else:
                    from torch.profiler import ProfilerActivity, profile

                    self.prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
                    self.prof.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 2:
                if cuda:
                    result["peak"] = torch.cuda.max_memory_allocated()
                else:
                    self.prof.__exit__(None, None, None)
                    result["peak"] = result["live_before"] + allocation_peak(self.prof)[0]

    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=micro_batch, gradient_accumulation_steps=1,
            max_steps=2, learning_rate=2e-4, bf16=True, gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, optim="adamw_torch", logging_steps=1,
            save_strategy="no", report_to=[], use_cpu=not cuda, dataloader_num_workers=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=rows, callbacks=[Measure()])
        trainer.train()
    Path(out).write_text(json.dumps(result))


def measure_hf(replica: Path, peft_method: str, seq_len: int, micro_batch: int, out: Path) -> dict:
    run([sys.executable, __file__, "--hf-step", str(replica), peft_method, str(seq_len), str(micro_batch), str(out)])
    return json.loads(out.read_text())


def planned(overrides: list[str]) -> int:
    """`trainer plan --json`'s total less its margin for our configured run."""
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "plan", "--json", *overrides,
                             "hardware.gpu_memory_gb=80"], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    if result.returncode != 0:
        sys.exit(result.stderr[-3000:])
    parts = json.loads(result.stdout)["configured"]["bytes_per_gpu"]
    return parts["total"] - parts["margin"]


def planned_hf(replica: Path, peft_method: str, seq_len: int, micro_batch: int) -> int:
    from trainer.plan import PlanInputs, estimate_memory, load_arch

    estimate = estimate_memory(PlanInputs(load_arch(str(replica)), peft_method=peft_method, lora_r=LORA["r"],
                                          precision="bf16", micro_batch_size=micro_batch, seq_len=seq_len,
                                          upcast_unquantized=True, loss_chunk_tokens=0))
    return estimate.total - estimate.margin


def loss_exactness(replica: Path, seq_len: int, micro_batch: int) -> tuple[float, float]:
    """(chunked, unchunked) loss sums on the replica in fp32 with LoRA, on one random batch."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    from trainer.objectives import DEFAULT_CHUNK_TOKENS
    from trainer.objectives.sft import SFTObjective, token_loss_sum

    model = transformers.AutoModelForCausalLM.from_pretrained(str(replica), dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], target_modules="all-linear",
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    torch.manual_seed(0)
    input_ids = torch.randint(4, model.config.vocab_size, (micro_batch, seq_len))
    labels = input_ids.clone()
    labels[:, :seq_len // 4] = -100
    with torch.no_grad():
        objective = SFTObjective(model, DEFAULT_CHUNK_TOKENS, log=lambda message: None)
        chunked = objective.loss_sum(model, {"input_ids": input_ids}, labels)
        unchunked = token_loss_sum(model(input_ids=input_ids).logits, labels)
    return float(chunked), float(unchunked)


def main(argv: list[str]) -> int:
    if argv and argv[0] == "--hf-step":
        replica, peft_method, seq_len, micro_batch, out = argv[1:]
        hf_step(replica, peft_method, int(seq_len), int(micro_batch), out)
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--micro-batch", type=int, default=2)
    args = parser.parse_args(argv)
    from trainer.replicas import build_replica

    rows, ratios = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        replica = build_replica("llama-3.1", Path(tmp) / "llama-3.1")
        for method in ("qlora", "lora"):
            overrides = our_overrides(replica, method, args.seq_len, args.micro_batch)
            ours = measure_ours(Path(tmp) / f"ours-{method}", overrides)
            (batch, seq_len), = ours["batch_shapes"]  # packed demo rows: nearly full; HF gets exactly this shape
            hf = measure_hf(replica, method, seq_len, batch, Path(tmp) / f"hf-{method}.json")
            ratios[method] = ours["peak"] / hf["peak"]
            rows.append([method, f"{batch}x{seq_len}", ours["peak"] / MB, planned(overrides) / MB, hf["peak"] / MB,
                         planned_hf(replica, method, seq_len, batch) / MB, f"{ratios[method]:.2f}"])
        chunked, unchunked = loss_exactness(replica, args.seq_len, args.micro_batch)
    print("peak memory of one training step, MB (llama-3.1 replica: vocabulary 128,256, 2 layers of width 64)")
    print(table(["method", "tokens", "ours", "ours planned", "HF recipe", "HF planned", "ours/HF"], rows))
    relative = abs(chunked / unchunked - 1)
    print(f"loss (fp32, LoRA, sum over label tokens): chunked {chunked:.6f}, unchunked {unchunked:.6f}, "
          f"relative difference {relative:.1e}")
    ok = ratios["qlora"] <= 0.6 and relative <= 1e-5
    print(f"QLoRA ours/HF {ratios['qlora']:.2f} (target <= 0.60); loss within 1e-5: {relative <= 1e-5} -> "
          f"{'ok' if ok else 'MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
