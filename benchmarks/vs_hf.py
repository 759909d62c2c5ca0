"""`trainer train` against Hugging Face Trainer on the same job, side by side in one run (interleaved).

The job: the embedded Llama, the demo's instruction data packed into rows of 256 tokens (prompts masked out of the
loss), global batch 8, fp32, constant LR, no weight decay, gradient clipping at 1.0; full fine-tuning and LoRA. Both
trainers get the same rows in the same order: ours with data.shuffle=false, Hugging Face's from our data pipeline
(the rows are the job's input, not what is measured), through its own packing collator (DataCollatorWithFlattening,
whose restarting position ids make Transformers keep the samples apart) and a sequential sampler. Each side runs in
a process of its own; tokens/s is steady state (the steps after the first two, from the wall clock between step
ends, so data loading and everything else a step costs counts); peak memory is the process's (CPU: peak RSS; CUDA:
the allocator's peak). Loss curves are compared step by step.

    python benchmarks/vs_hf.py [--steps 30] [--repeats 2] [--methods full,lora] [--seq-len 256]

On CUDA the same runs use bf16 and report MFU from the model's FLOPs per token as well."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, table

WARMUP_STEPS = 2


def job_overrides(method: str, steps: int, seq_len: int, batch: int, precision: str) -> list[str]:
    """`trainer train` overrides of the job; the Hugging Face side reads its settings from the same config."""
    peft = ["peft=none", "optim.lr=1e-4"] if method == "full" else ["peft=lora", "peft.dropout=0.0", "optim.lr=2e-4"]
    return [*peft, f"data.max_seq_len={seq_len}", "data.packing=true", "data.shuffle=false",
            f"train.micro_batch_size={batch}", f"train.global_batch_size={batch}", f"train.max_steps={steps}",
            f"train.precision={precision}", "optim.scheduler=constant", "optim.warmup_ratio=0",
            "optim.weight_decay=0.0", "optim.max_grad_norm=1.0", "eval.every_n_steps=0", "eval.max_batches=1",
            "eval.generate_samples=0", "checkpoint.every_n_steps=0", "logger.every_n_steps=1",
            "logger.progress=false", "logger.plot=false"]


def steady(times: list[float], tokens: list[int]) -> float:
    """Tokens per second over the steps after the warm-up, from the times at which steps ended."""
    return sum(tokens[WARMUP_STEPS:]) / (times[-1] - times[WARMUP_STEPS - 1])


# --------------------------------------------------------------------------------------------------- ours
def run_ours(overrides: list[str], run_dir: Path) -> dict:
    command = [sys.executable, "-m", "trainer.cli", "train", f"run.dir={run_dir}", *overrides]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"trainer train failed:\n{result.stderr[-3000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "loss" in r and "step_seconds" in r]
    summary = json.loads((run_dir / "summary.json").read_text())
    tokens = [round(r["tokens_per_second"] * r["step_seconds"]) for r in steps]
    return {"losses": [r["loss"] for r in steps], "grad_norms": [r["grad_norm"] for r in steps], "tokens": tokens,
            "times": [r["time"] for r in steps], "peak_memory_bytes": summary["peak_memory_bytes"]}


# ------------------------------------------------------------------------------------------- Hugging Face
def run_hf(overrides: list[str], out: Path, layout: str) -> dict:
    command = [sys.executable, __file__, "--hf-worker", json.dumps(overrides), str(out), layout]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"Hugging Face Trainer failed:\n{result.stderr[-3000:]}")
    return json.loads(out.read_text())


def hf_worker(overrides: list[str], out: Path, layout: str) -> None:
    """Train the job with transformers.Trainer in this process; write its step times, losses and peak memory.
    `layout`: `flatten` (HF's packing collator: the same job) or `rows` (each packed row one plain causal sequence,
    padded: attention crosses the samples' boundaries, so not the same job, but the fastest layout HF has)."""
    sys.path.insert(0, str(REPO))
    import resource

    import torch
    from torch.utils.data import SequentialSampler
    from transformers import (
        AutoModelForCausalLM,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from launch.data_check import compose
    from trainer.data import build_datasets
    from trainer.model import load_tokenizer

    cfg = compose(overrides)
    tokenizer = load_tokenizer(cfg.model)
    rows = build_datasets(cfg.data, tokenizer, cfg.seed, cache_dir=cfg.paths.cache_dir).train
    features = [[{"input_ids": [int(t) for t in s.input_ids], "labels": [int(t) for t in s.labels]}
                 for s in (row.samples if hasattr(row, "samples") else (row,))] for row in rows]
    flatten = DataCollatorWithFlattening(return_position_ids=True)

    def as_rows(batch):
        length = max(sum(len(s["input_ids"]) for s in row) for row in batch)
        ids = torch.full((len(batch), length), tokenizer.pad_token_id or 0)
        labels = torch.full((len(batch), length), -100)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        for i, row in enumerate(batch):
            row_ids = [t for s in row for t in s["input_ids"]]
            row_labels = [t for s in row for t in [-100] + s["labels"][1:]]
            ids[i, :len(row_ids)], labels[i, :len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_labels)
            mask[i, :len(row_ids)] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}
    bf16 = cfg.train.precision == "bf16"

    torch.manual_seed(cfg.seed)  # as `trainer train` seeds before it builds the model: the same LoRA init
    model = AutoModelForCausalLM.from_pretrained(cfg.model.path, attn_implementation="sdpa",
                                                 dtype=torch.float32)
    if cfg.peft.name == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha,
                                                 lora_dropout=cfg.peft.dropout,
                                                 target_modules=cfg.peft.target_modules, task_type="CAUSAL_LM"))

    times, losses = [], []

    class StepTimes(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.time())

    class InOrder(Trainer):
        def _get_train_sampler(self, train_dataset=None):
            return SequentialSampler(train_dataset if train_dataset is not None else self.train_dataset)

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append((result[0] if return_outputs else result).detach())
            return result

    args = TrainingArguments(
        output_dir=str(out.parent / "hf"), per_device_train_batch_size=cfg.train.micro_batch_size,
        max_steps=cfg.train.max_steps, learning_rate=cfg.optim.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.optim.max_grad_norm, adam_beta1=cfg.optim.betas[0],
        adam_beta2=cfg.optim.betas[1], adam_epsilon=cfg.optim.eps, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_drop_last=True, seed=cfg.seed, disable_tqdm=True, bf16=bf16,
        use_cpu=not torch.cuda.is_available())
    trainer = InOrder(model=model, args=args, train_dataset=features, callbacks=[StepTimes()],
                      data_collator=as_rows if layout == "rows" else
                      lambda batch: flatten([sample for row in batch for sample in row]))
    trainer.train()
    per_step = len(features) // cfg.train.global_batch_size  # our sampler's epoch: the incomplete tail dropped
    order = [(step % per_step) * cfg.train.global_batch_size for step in range(len(times))]
    tokens = [sum(len(rows[i]) for i in range(start, start + cfg.train.global_batch_size)) for start in order]
    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    norms = [float(entry["grad_norm"]) for entry in trainer.state.log_history if "grad_norm" in entry]
    out.write_text(json.dumps({"losses": [float(x) for x in losses], "grad_norms": norms, "tokens": tokens,
                               "times": times, "peak_memory_bytes": int(peak)}))


# ------------------------------------------------------------------------------------------------- report
def flops_per_token(model_path: str, method: str) -> float:
    """Training FLOPs per token: 6 x parameters (2 forward, 4 backward) for full fine-tuning; LoRA skips the frozen
    weights' gradients (about 4 x parameters). Attention's quadratic term is left out (short rows)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with __import__("torch").device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    parameters = sum(p.numel() for p in model.parameters())
    return (6 if method == "full" else 4) * parameters


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--hf-worker":
        hf_worker(json.loads(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved runs of each side per method")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    import torch

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    flops = flops_per_token(_model_path(), "full") if cuda else 0.0
    sides = (("hf", "HF Trainer, packing collator"), ("hf-rows", "HF Trainer, rows unmasked*"),
             ("trainer", "trainer train"), ("trainer-eager", "trainer train, eager attention"))
    rows, agreement = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for method in args.methods.split(","):
            overrides = job_overrides(method, args.steps, args.seq_len, args.batch, "bf16" if cuda else "fp32")
            # The same job with another attention kernel (eager: matmul + softmax instead of SDPA): how far fp32
            # rounding alone moves our own loss curve.
            eager = [*overrides, "model.attn_implementation=eager"]
            results = {side: [] for side, _ in sides}
            for repeat in range(args.repeats):  # interleaved: a noisy moment hurts every side alike
                results["trainer"].append(run_ours(overrides, Path(tmp) / f"{method}-ours-{repeat}"))
                results["hf"].append(run_hf(overrides, Path(tmp) / f"{method}-hf-{repeat}.json", "flatten"))
                results["hf-rows"].append(run_hf(overrides, Path(tmp) / f"{method}-rows-{repeat}.json", "rows"))
                results["trainer-eager"].append(run_ours(eager, Path(tmp) / f"{method}-eager-{repeat}"))
            speed = {side: statistics.median(steady(r["times"], r["tokens"]) for r in runs)
                     for side, runs in results.items()}
            for side, label in sides:
                tokens_per_step = statistics.mean(results[side][0]["tokens"])
                row = [f"{method}: {label}", speed[side], 1000 * tokens_per_step / speed[side],
                       max(r["peak_memory_bytes"] for r in results[side]) / 2**20,
                       f"{speed[side] / speed['hf']:.2f}x", f"{speed[side] / speed['hf-rows']:.2f}x"]
                if cuda:  # model FLOPs utilisation against the card's dense bf16 peak (an H100 SXM's here)
                    factor = 1.0 if method == "full" else 4 / 6
                    row.append(f"{100 * speed[side] * flops * factor / 989e12:.2f}%")
                rows.append(row)
            agreement.append((method, results["trainer"][0], results["hf"][0], results["trainer-eager"][0]))
    print(f"{device}; embedded Llama, the demo data packed into rows of <= {args.seq_len} tokens, global batch "
          f"{args.batch}, {args.steps} steps, {'bf16' if cuda else 'fp32'}; median of {args.repeats} interleaved runs")
    headers = ["job", "tokens/s", "ms/step", "peak MiB", "vs HF", "vs HF rows*"] + (["MFU"] if cuda else [])
    print(table(headers, rows))
    print("* rows unmasked: each packed row one causal sequence, so its samples attend to each other -- not the same "
          "job (other losses), the fastest layout HF Trainer has, for speed only")
    print("loss curves against trainer train's (relative differences; fp32 rounding, which Adam's first steps -- about "
          "lr x the sign of each gradient entry -- amplify, so curves drift apart over the steps, however exact):")
    for method, ours, *others in agreement:
        for label, other in zip(("HF Trainer, packing collator", "trainer train, eager attention"), others):
            print(f"  {method}, {label}: step 1 loss {_difference(ours['losses'][0], other['losses'][0]):.0e}, "
                  f"grad norm {_difference(ours['grad_norms'][0], other['grad_norms'][0]):.0e}; steps 1-5 at most "
                  f"{max(map(_difference, ours['losses'][:5], other['losses'][:5])):.0e}; all steps on average "
                  f"{statistics.mean(map(_difference, ours['losses'], other['losses'])):.1e}")


def _difference(ours: float, theirs: float) -> float:
    return abs(ours - theirs) / abs(theirs)


def _model_path() -> str:
    sys.path.insert(0, str(REPO))
    from launch.data_check import compose

    return compose([]).model.path


if __name__ == "__main__":
    main()
