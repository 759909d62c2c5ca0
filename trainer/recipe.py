"""The one training recipe: build everything from the frozen config, train, evaluate, save, summarise.

It knows nothing about how the model is sharded (the `Strategy` does) or where metrics go (the logger
does). Loss is normalised by the number of label tokens in the whole global batch, over all micro batches
and ranks, so splitting a global batch 1x4 or 4x1 (or over ranks) gives the same gradient.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field

from trainer.config.frozen import config_to_dict
from trainer.config.schema import Config


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0  # input tokens (padding excluded) consumed by training
    best_eval_loss: float = math.inf
    evals_without_improvement: int = 0
    skipped_steps: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_before: dict = field(default_factory=dict)


def seed_everything(seed: int, deterministic: bool) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)


class Recipe:
    def __init__(self, config: Config):
        from trainer.data import build_datasets
        from trainer.data.loader import GlobalBatchSampler
        from trainer.log import build_logger
        from trainer.model import load_tokenizer
        from trainer.strategy import build_strategy

        self.config = config
        self.run_dir = config.run.dir
        os.makedirs(self.run_dir, exist_ok=True)
        seed_everything(config.seed, config.train.deterministic)
        self.strategy = build_strategy(config.strategy, config.train)
        self.logger = build_logger(config.logger, self.run_dir, config.run.name, config_to_dict(config),
                                   self.strategy.is_main)
        self.tokenizer = load_tokenizer(config.model)
        self.data = build_datasets(config.data, self.tokenizer, config.seed)
        self.accumulation_steps = self._accumulation_steps()
        self.sampler = GlobalBatchSampler(len(self.data.train), config.train.global_batch_size, config.seed,
                                          config.data.shuffle)
        self.total_steps = config.train.max_steps or max(1, math.ceil(config.train.epochs * self.sampler.steps_per_epoch))
        self.model, self.optimizer, self.scheduler = self._build_model()
        self.state = TrainState()

    def _accumulation_steps(self) -> int:
        """Derived, never configured: global batch = micro batch x ranks x accumulation."""
        from trainer.errors import ConfigError

        train, world = self.config.train, self.strategy.world_size
        if train.global_batch_size % (train.micro_batch_size * world):
            raise ConfigError("train.global_batch_size", f"{train.global_batch_size} is not a multiple of "
                              f"micro_batch_size x world_size = {train.micro_batch_size} x {world}")
        if len(self.data.train) < train.global_batch_size:
            raise ConfigError("train.global_batch_size", f"{train.global_batch_size} is larger than the "
                              f"{len(self.data.train)} usable training rows; lower it or add data")
        return train.global_batch_size // (train.micro_batch_size * world)

    def _build_model(self):
        from trainer.adapters import apply_peft, parameter_report
        from trainer.model import load_model, torch_dtype
        from trainer.optim import build_optimizer, build_scheduler

        import torch

        # Trainable weights stay fp32 (the optimizer's master copy); autocast gives bf16/fp16 compute.
        # Frozen base weights under PEFT never see an update, so they can live in the compute dtype.
        frozen_dtype = torch_dtype(self.config.train.precision) if self.config.peft.name != "none" else torch.float32
        model = load_model(self.config.model, frozen_dtype if self.config.train.precision != "fp16" else torch.float32)
        model = apply_peft(model, self.config.peft)
        for param in model.parameters():
            if param.requires_grad and param.dtype != torch.float32:
                param.data = param.data.float()
        self.logger.info(str(parameter_report(model)))
        model, optimizer = self.strategy.setup(model, lambda m: build_optimizer(m, self.config.optim))
        return model, optimizer, build_scheduler(optimizer, self.config.optim, self.total_steps)

    # ----------------------------------------------------------------------------------------- training
    def train(self) -> dict:
        from trainer.checkpoint import CheckpointManager
        from trainer.metrics import Throughput, peak_memory_bytes

        cfg = self.config
        checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.strategy)
        resumed_from = checkpoints.resume(cfg.resume, self)
        if resumed_from is None:
            self.state.eval_before = self.evaluate(step=0)
        self.logger.info(f"training {self.total_steps} steps: global batch {cfg.train.global_batch_size} = micro "
                         f"{cfg.train.micro_batch_size} x {self.strategy.world_size} ranks x "
                         f"{self.accumulation_steps} accumulation; {len(self.data.train)} training rows")
        throughput, status = Throughput(), "completed"
        while self.state.step < self.total_steps:
            started = time.perf_counter()
            metrics = self.train_step()
            metrics["tokens_per_second"] = throughput.update(metrics.pop("num_tokens"), time.perf_counter() - started)
            step = self.state.step
            if self._every(cfg.logger.every_n_steps, step):
                self.logger.log_train(step, metrics)
            self.logger.progress(step, self.total_steps, metrics)
            if self._every(cfg.eval.every_n_steps, step) and step < self.total_steps:
                if self._early_stop(self.evaluate(step)):
                    status = "early_stopped"
                    break
            if self._every(cfg.checkpoint.every_n_steps, step):
                checkpoints.save(self)
        eval_after = self.evaluate(step=self.state.step)
        final_dir = self.save_final()
        return self._summary(status, eval_after, final_dir, throughput.steady_tokens_per_second,
                             peak_memory_bytes(self.strategy.device))

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns metrics (host sync only for logged values)."""
        from trainer.data.loader import collate, local_microbatches
        from trainer.evaluate import token_loss_sum

        import torch

        cfg, strategy = self.config, self.strategy
        global_indices = self.sampler.next_global_batch()
        rows = [self.data.train[i] for i in global_indices]
        # Every rank sees the whole global batch's indices, so it can count its label tokens without a collective.
        num_label_tokens = sum(row.num_label_tokens for row in rows)
        micro_batches = local_microbatches(global_indices, strategy.rank, strategy.world_size, cfg.train.micro_batch_size)
        loss_sum = torch.zeros((), device=strategy.device)
        num_tokens = 0
        for index, micro in enumerate(micro_batches):
            batch_rows = [self.data.train[i] for i in micro]
            batch = collate(batch_rows, self.tokenizer.pad_token_id).to(strategy.device)
            num_tokens += batch.num_tokens
            with strategy.microbatch(self.model, is_last=index == len(micro_batches) - 1):
                with strategy.autocast():
                    logits = self.model(**batch.inputs).logits
                micro_loss_sum = token_loss_sum(logits, batch.labels)
                strategy.backward(micro_loss_sum / num_label_tokens * strategy.loss_multiplier)
            loss_sum += micro_loss_sum.detach()
        grad_norm, applied = strategy.step(self.model, self.optimizer, cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state.step += 1
        self.state.skipped_steps += 0 if applied else 1
        global_tokens = int(strategy.all_reduce_sum(num_tokens))
        self.state.tokens_seen += global_tokens
        metrics = {"num_tokens": global_tokens, "lr": lr}
        if self._every(cfg.logger.every_n_steps, self.state.step) or self.state.step in (1, self.total_steps):
            loss = strategy.all_reduce_sum(float(loss_sum)) / num_label_tokens
            metrics.update(loss=loss, grad_norm=grad_norm, label_tokens=num_label_tokens,
                           epoch=self.sampler.state.epoch)
            self.state.first_loss = loss if self.state.first_loss is None else self.state.first_loss
            self.state.last_loss = loss
        return metrics

    @staticmethod
    def _every(n: int, step: int) -> bool:
        return n > 0 and step % n == 0

    def _early_stop(self, eval_metrics: dict) -> bool:
        """Track the best eval loss; True once `early_stopping_patience` evaluations brought no improvement."""
        cfg = self.config.eval
        loss = eval_metrics.get("loss", math.inf)
        if loss < self.state.best_eval_loss - cfg.early_stopping_min_delta:
            self.state.best_eval_loss, self.state.evals_without_improvement = loss, 0
            return False
        self.state.evals_without_improvement += 1
        if cfg.early_stopping_patience and self.state.evals_without_improvement >= cfg.early_stopping_patience:
            self.logger.info(f"early stopping at step {self.state.step}: eval loss has not improved for "
                             f"{self.state.evals_without_improvement} evaluations (best {self.state.best_eval_loss:.4f})")
            return True
        return False

    # --------------------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int) -> dict:
        from trainer.evaluate import evaluate_loss, generation_metrics

        cfg = self.config
        metrics = evaluate_loss(self.model, self.data.val, self.strategy, cfg.train.micro_batch_size,
                                self.tokenizer.pad_token_id, cfg.eval.max_batches)
        if cfg.eval.generate_samples and self.data.val_samples:
            samples = self.data.val_samples[:cfg.eval.generate_samples]
            generated, examples = generation_metrics(self.model, self.tokenizer, samples, self.strategy,
                                                     cfg.eval.max_new_tokens)
            metrics.update(generated)
            if examples:
                self.logger.info(f"sample @ step {step}: {examples[0]['prompt']!r} -> {examples[0]['answer']!r} "
                                 f"(reference {examples[0]['reference']!r})")
        if metrics:
            self.logger.log_eval(step, metrics)
            if step == 0 or math.isinf(self.state.best_eval_loss):
                self.state.best_eval_loss = min(self.state.best_eval_loss, metrics.get("loss", math.inf))
        return metrics

    # ------------------------------------------------------------------------------------------ outputs
    def save_final(self) -> str:
        """final/: a Hugging Face model dir (full fine-tune) or a PEFT adapter dir, with the tokenizer."""
        from trainer.checkpoint import save_pretrained_atomically

        final_dir = os.path.join(self.run_dir, "final")
        if self.strategy.is_main:
            save_pretrained_atomically(self.strategy.unwrap(self.model), self.tokenizer, final_dir)
        self.strategy.barrier()
        return final_dir

    def _summary(self, status: str, eval_after: dict, final_dir: str, tokens_per_second, peak_memory: int) -> dict:
        return {
            "status": status,
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "skipped_steps": self.state.skipped_steps,
            "tokens_seen": self.state.tokens_seen,
            "train_loss_first": self.state.first_loss,
            "train_loss_last": self.state.last_loss,
            "eval_before": self.state.eval_before,
            "eval_after": eval_after,
            "tokens_per_second": tokens_per_second,
            "peak_memory_bytes": peak_memory,
            "world_size": self.strategy.world_size,
            "final_dir": final_dir,
        }

    def close(self) -> None:
        self.logger.close()
        self.strategy.close()


def write_summary(run_dir: str, summary: dict) -> str:
    path = os.path.join(run_dir, "summary.json")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(summary, fh, indent=2)
    os.replace(tmp, path)
    return path


def run_training(config: Config) -> int:
    """Run the recipe for a frozen config; rank 0 writes summary.json and the loss curve."""
    from trainer.metrics import plot_loss_curve

    started = time.time()
    recipe = Recipe(config)
    try:
        summary = recipe.train()
        summary["wall_seconds"] = round(time.time() - started, 1)
        if recipe.strategy.is_main:
            write_summary(config.run.dir, summary)
            if config.logger.plot:
                plot_loss_curve(os.path.join(config.run.dir, "metrics.jsonl"), os.path.join(config.run.dir, "loss_curve.png"))
            _print_result(recipe, summary)
    finally:
        recipe.close()
    return 0


def _print_result(recipe: Recipe, summary: dict) -> None:
    before, after = summary["eval_before"], summary["eval_after"]
    lines = [f"run {summary['status']}: {summary['steps']} steps in {summary['wall_seconds']} s; "
             f"train loss {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}"]
    if before or after:
        lines.append(f"{'metric':<14}{'before':>10}{'after':>10}")
        for key in sorted(set(before) | set(after)):
            lines.append(f"{key:<14}{before.get(key, float('nan')):>10.4f}{after.get(key, float('nan')):>10.4f}")
    lines.append(f"run dir: {recipe.run_dir}  (summary.json, metrics.jsonl, loss_curve.png, final/)")
    print("\n".join(lines), flush=True)
