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
from dataclasses import dataclass, field

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
        self.strategy = build_strategy(config.strategy, config.train, config.optim)
        self.logger = build_logger(config.logger, self.run_dir, config.run.name, config_to_dict(config),
                                   self.strategy.is_main)
        self.tokenizer = load_tokenizer(config.model)
        from trainer.objectives import pair_mode

        self.data = build_datasets(config.data, self.tokenizer, config.seed, cache_dir=config.paths.cache_dir,
                                   pairs=pair_mode(config.objective))
        self.logger.info(self.data.report.summary_line())
        for warning in self.data.report.warnings():
            self.logger.info(warning)
        from trainer.forgetting import build_forgetting_rows

        self.forgetting_rows = build_forgetting_rows(config, self.tokenizer)
        # EWC's Fisher data, read now like the other data files so a bad record is refused before the model loads.
        self.fisher_rows = self._fisher_rows()
        self.accumulation_steps = self._accumulation_steps()
        self.sampler = GlobalBatchSampler(len(self.data.train), config.train.global_batch_size, config.seed,
                                          config.data.shuffle, data_fingerprint=self.data.fingerprint,
                                          max_steps_per_epoch=config.train.max_steps_per_epoch)
        epoch_steps = math.ceil(config.train.epochs * self.sampler.steps_per_epoch)
        self.total_steps = config.train.max_steps or max(1, epoch_steps)
        self.model, self.optimizer, self.scheduler = self._build_model()
        from trainer.objectives import build_objective

        self.objective = build_objective(config.objective, self.strategy.unwrap(self.model), log=self.logger.info)
        self.pairs = getattr(self.objective, "pairs", False)
        if self.pairs and config.data.packing:  # each micro batch's answers packed into rows of max_seq_len
            self.objective.packing_capacity = config.data.max_seq_len
            self.logger.info(f"packing: each micro batch's answers share rows of <= {config.data.max_seq_len} tokens "
                             "(attention and positions kept per answer)")
        # DPO/IPO/KTO: {"train": [n, 2], "val": [n_val, 2]} reference log-probs (KTO: answer, mismatched answer)
        self.reference: dict | None = None
        self.anchor = None  # regularize: EWC / L2 towards the starting weights (trainer/regularize.py), else None
        self.state = TrainState()
        self.state_bytes: dict | None = None  # this rank's parameter/gradient/optimizer bytes after step 1

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
        from trainer.adapters import parameter_report
        from trainer.freezing import build_freezing_schedule
        from trainer.model import build_model
        from trainer.optim import build_optimizer, build_scheduler

        def build(**kwargs):
            model = build_model(self.config.model, self.config.peft, self.config.train.precision,
                                freeze=self.config.optim.freeze, **kwargs)
            if self.config.train.embedding_on_host:  # before the strategy's checkpointing hooks the embedding
                from trainer.host_embedding import keep_input_embedding_on_host

                held = keep_input_embedding_on_host(model)
                self.logger.info(f"train.embedding_on_host: the input embedding ({held / 2**30:.2f} GiB) stays in "
                                 "host memory; each forward looks its tokens up there")
            return model

        model, optimizer = self.strategy.setup(build, lambda m: build_optimizer(m, self.config.optim))
        # from_pretrained hands the model back in eval mode, where dropout, transformers' gradient checkpointing and
        # the MoE routers' outputs for the load-balancing loss are all switched off. Evaluation restores this mode.
        model.train()
        self.logger.info(str(parameter_report(self.strategy.unwrap(model))))
        if self.config.train.activation_offloading:
            self.logger.info("train.activation_offloading: each checkpointed layer's input waits in host memory from "
                             "the forward until backward recomputes the layer")
        if self.strategy.compiled_layers:
            self.logger.info(f"train.compile: {self.strategy.compiled_layers} decoder layers, compiled by their first "
                             "step (and once more when the row length first changes)")
        self.freezing = build_freezing_schedule(self.strategy.unwrap(model), self.config.optim.freeze, self.logger.info)
        from trainer.moe import build_router_loss

        self.router_loss = build_router_loss(self.strategy.unwrap(model))  # MoE: the load-balancing loss, else None
        return model, optimizer, build_scheduler(optimizer, self.config.optim, self.total_steps)

    # ----------------------------------------------------------------------------------------- training
    def train(self) -> dict:
        from trainer.checkpoint import CheckpointManager
        from trainer.metrics import Throughput, peak_memory_bytes
        from trainer.preemption import watch

        cfg = self.config
        # Installed by the worker (or launcher) at its start; a request that came since then is answered here.
        self.preemption = watch()
        checkpoints = CheckpointManager(self.run_dir, cfg.checkpoint, self.strategy, log=self.logger.info)
        configured = self._optimizer_settings()
        if checkpoints.resume(cfg.resume, self) is None:
            self._prepare_reference(resumed=False)
            self._prepare_anchor(resumed=False)
            self.state.eval_before = self._evaluate_unless_preempted(step=0) or {}
        else:
            self._prepare_reference(resumed=True)
            self._prepare_anchor(resumed=True)
            self._apply_optimizer_settings(configured)
        self.logger.info(f"training {self.total_steps} steps: global batch {cfg.train.global_batch_size} = micro "
                         f"{cfg.train.micro_batch_size} x {self.strategy.world_size} ranks x "
                         f"{self.accumulation_steps} accumulation; {len(self.data.train)} training rows")
        throughput = Throughput()
        self.peak_bytes = 0
        from trainer.profiling import StepProfiler

        profiler = StepProfiler(cfg.logger.profile_steps, self.run_dir, self.strategy.rank, self.strategy.device,
                                log=self.logger.info)
        from trainer.preemption import TRAINING_STARTED

        TRAINING_STARTED.set()
        try:
            status, saved_step = self._loop(cfg, checkpoints, throughput, profiler)
        finally:
            profiler.close()  # also when a step raises: the profiler's threads and buffers go with it
        status, eval_after, final_dir = self._finish(status, checkpoints, saved_step)
        return self._summary(status, eval_after, final_dir, throughput.steady_tokens_per_second,
                             max(self.peak_bytes, peak_memory_bytes(self.strategy.device)))

    def _loop(self, cfg, checkpoints, throughput, profiler) -> tuple[str, int | None]:
        """The optimizer steps, with their logging, evaluation, checkpoints and stops: (status, last saved step)."""
        from trainer.metrics import peak_memory_bytes

        status, saved_step = "completed", None
        # A request during start-up (or the baseline eval) is answered at the first step boundary, so every requeued
        # run makes progress even when the preemptions come quicker than the start-up.
        while self.state.step < self.total_steps:
            started = time.perf_counter()
            self.freezing.on_step(self.state.step)  # gradual unfreezing (a no-op unless configured)
            metrics = self.train_step()
            self.peak_bytes = max(self.peak_bytes, peak_memory_bytes(self.strategy.device))
            profiler.step()
            metrics["step_seconds"] = time.perf_counter() - started
            metrics["tokens_per_second"] = throughput.update(metrics.pop("num_tokens"), metrics["step_seconds"])
            self.state_bytes = self.state_bytes or self.strategy.local_state_bytes(self.model, self.optimizer)
            step = self.state.step
            if self._every(cfg.logger.every_n_steps, step) or "nonfinite" in metrics:
                self.logger.log_train(step, metrics)
            self.logger.progress(step, self.total_steps, metrics)
            if "nonfinite" in metrics and self._nonfinite_stops(metrics["nonfinite"]):
                status = "stopped_nonfinite"  # before any save: the last committed checkpoint stays the newest
                break
            checkpoints.poll()  # commit a finished background save
            # Every epoch has exactly steps_per_epoch steps (the incomplete tail is reshuffled into the next one).
            epoch_ended = step % max(1, self.sampler.steps_per_epoch) == 0
            if (self._every(cfg.eval.every_n_steps, step) or (epoch_ended and cfg.eval.every_epoch)) \
                    and step < self.total_steps:
                eval_metrics = self._evaluate_unless_preempted(step)
                if eval_metrics is not None and self._early_stop(eval_metrics):
                    status = "early_stopped"
                    break
            if checkpoints.due(step, epoch_ended) and checkpoints.save(self):
                saved_step = step
            if self.preemption.should_stop(self.strategy):
                status = self._stop_for_preemption(checkpoints, saved_step)
                break
        return status, saved_step

    def _finish(self, status: str, checkpoints, saved_step: int | None) -> tuple[str, dict, str | None]:
        """After the loop: the final evaluation (a preemption request stops it and keeps the trained state as a
        checkpoint) and final/ (a request during that save is absorbed: the run completes, docs/checkpoints.md)."""
        eval_after = {}
        if status not in ("preempted", "stopped_nonfinite"):
            eval_after = self._evaluate_unless_preempted(self.state.step)
            if eval_after is None:
                status = self._stop_for_preemption(checkpoints, saved_step)
        checkpoints.finish()  # a background save still in flight is committed before the run ends
        if status in ("preempted", "stopped_nonfinite"):
            return status, {}, None
        final_dir = self.save_final()
        self.logger.log_final_model(final_dir, "adapter" if self.config.peft.name != "none" else "model")
        if self.preemption.reason:
            self.logger.info(f"{self.preemption.reason} during the final save: the run is complete, nothing to resume")
        return status, eval_after, final_dir

    def _prepare_reference(self, resumed: bool) -> None:
        """DPO/IPO/KTO: the starting policy's log-probs of every pair, computed before step 1 or loaded on resume."""
        if not (self.pairs and self.objective.needs_reference):
            return
        from trainer.objectives.reference import FILE, compute_reference_logps, load_reference, save_reference

        if resumed:
            self.reference = load_reference(self.run_dir, self.data.fingerprint)
            return
        started = time.perf_counter()
        cfg = self.config
        self.reference = {
            role: compute_reference_logps(self.objective, self.model, pairs, self.strategy,
                                          cfg.train.micro_batch_size, self.tokenizer.pad_token_id,
                                          cfg.model.attn_implementation)
            for role, pairs in (("train", self.data.train), ("val", self.data.val_pairs))}
        if self.strategy.is_main:
            save_reference(self.run_dir, self.reference, self.data.fingerprint)
        self.strategy.barrier()
        unit = "answers" if self.objective.method == "kto" else "pairs"
        self.logger.info(f"reference log-probs of {len(self.data.train):,} training and {len(self.data.val_pairs):,} "
                         f"validation {unit}: {time.perf_counter() - started:.1f} s ({FILE})")

    def _fisher_rows(self) -> list:
        """The records EWC estimates the Fisher information on (regularize.fisher_path, else data.replay's), tokenised
        as training would; [] without EWC."""
        from trainer.forgetting import general_rows
        from trainer.regularize import fisher_source

        reg = self.config.regularize
        if not reg.ewc_lambda:
            return []
        path, data_format = fisher_source(reg, self.config.data.replay)
        return general_rows(self.config, self.tokenizer, path, data_format, reg.fisher_samples)

    def _prepare_anchor(self, resumed: bool) -> None:
        """regularize: the weights the EWC / L2 penalties hold the model near, and their Fisher information."""
        from trainer.regularize import build_anchor, fisher_source

        cfg = self.config
        path, _ = fisher_source(cfg.regularize, cfg.data.replay)
        self.anchor = build_anchor(
            cfg.regularize, self.strategy.unwrap(self.model), self.optimizer, self.strategy, self.objective,
            fisher_rows=self.fisher_rows, fisher_path=path, pad_id=self.tokenizer.pad_token_id,
            run_dir=self.run_dir, log=self.logger.info, resumed=resumed)

    def _evaluate_unless_preempted(self, step: int) -> dict | None:
        """An evaluation that a preemption request stops between batches (None then): its metrics are dropped and
        the step boundary right after it saves and stops."""
        from trainer.preemption import Preempted

        try:
            return self.evaluate(step, check=lambda: self.preemption.check(self.strategy))
        except Preempted:
            self.logger.info(f"{self.preemption.signal_name}: evaluation at step {step} "
                             "stopped")
            return None

    def _stop_for_preemption(self, checkpoints, saved_step: int | None) -> str:
        step = self.state.step
        self.logger.info(f"{self.preemption.signal_name}: stopping at step {step}")
        if saved_step != step:
            checkpoints.save(self)
        return "preempted"

    def _optimizer_settings(self) -> tuple[list, list]:
        """(the scheduler's base LRs, each param group's hyperparameters) as built from this run's config."""
        keys = ("weight_decay", "betas", "eps")
        groups = [{k: g[k] for k in keys if k in g} for g in self.optimizer.param_groups]
        return list(self.scheduler.base_lrs), groups

    def _apply_optimizer_settings(self, configured: tuple[list, list]) -> None:
        """A resume restores the optimizer's hyperparameters and the scheduler's base LRs from the checkpoint; the
        launcher let a different value through only where run.allow_changes asked for it (trainer/run_identity.py),
        so the config's values are the ones to train with from here. Unchanged values are left untouched."""
        base_lrs, groups = configured
        if list(self.scheduler.base_lrs) != base_lrs:
            self.scheduler.base_lrs = list(base_lrs)
            for group, base, schedule in zip(self.optimizer.param_groups, base_lrs, self.scheduler.lr_lambdas):
                group["lr"] = base * schedule(self.scheduler.last_epoch)
            self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]
        for group, wanted in zip(self.optimizer.param_groups, groups):
            for key, value in wanted.items():
                if group.get(key) != value:
                    group[key] = value

    def train_step(self) -> dict:
        """One optimizer step over one global batch; returns metrics (host sync only for logged values)."""
        import torch

        from trainer.data.loader import collate, local_microbatches

        cfg, strategy = self.config, self.strategy
        if strategy.device.type == "cuda":  # peak_memory_gib is this step's peak (the summary keeps the run's)
            torch.cuda.reset_peak_memory_stats(strategy.device)
        global_indices = self.sampler.next_global_batch()
        rows = [self.data.train[i] for i in global_indices]
        # Every rank sees the whole global batch's indices, so it can count its label tokens (pairs, for a
        # preference objective) without a collective.
        num_label_tokens = self.objective.loss_units(rows)
        micro_batches = local_microbatches(global_indices, strategy.rank, strategy.world_size,
                                           cfg.train.micro_batch_size)
        loss_sum = torch.zeros((), device=strategy.device)
        router_sum = torch.zeros((), device=strategy.device)
        # The router loss is a mean per micro batch: averaged over every micro batch of the step, on all ranks.
        router_share = 1.0 / (len(micro_batches) * strategy.world_size)
        num_tokens = 0
        pair_sums: dict = {}
        for index, micro in enumerate(micro_batches):
            batch_rows = [self.data.train[i] for i in micro]
            batch = (self.objective.collate if self.pairs else collate)(
                batch_rows, self.tokenizer.pad_token_id, cfg.model.attn_implementation).to(strategy.device)
            num_tokens += batch.num_tokens
            with strategy.microbatch(self.model, is_last=index == len(micro_batches) - 1):
                if self.router_loss:
                    self.router_loss.discard()
                if self.pairs:
                    reference = self.reference["train"][micro] if self.reference else None
                    micro_loss_sum, stats = self.objective.pair_loss(self.model, batch, reference, strategy.autocast)
                    for key, value in stats.items():
                        pair_sums[key] = pair_sums.get(key, 0.0) + float(value)
                else:
                    micro_loss_sum = self.objective.loss_sum(self.model, batch.inputs, batch.labels,
                                                             strategy.autocast)
                router = self.router_loss.pop(batch.token_mask) if self.router_loss else 0.0
                micro_loss = micro_loss_sum / num_label_tokens + router * router_share
                if self.anchor is not None and index == len(micro_batches) - 1:
                    # Once per step; every rank adds its 1/world share, which the ranks' gradient average undoes.
                    penalty, penalty_terms = self.anchor.penalty()
                    micro_loss = micro_loss + penalty / strategy.world_size
                strategy.backward(micro_loss * strategy.loss_multiplier)
            loss_sum += micro_loss_sum.detach()
            router_sum += router.detach() if torch.is_tensor(router) else router
        grad_norm, applied = strategy.step(self.model, self.optimizer, cfg.optim.max_grad_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        self.state.step += 1
        self.state.skipped_steps += 0 if applied else 1
        global_tokens = int(strategy.all_reduce_sum(num_tokens))
        self.state.tokens_seen += global_tokens
        metrics = {"num_tokens": global_tokens, "lr": lr}
        # Reduced every step, not only on logged ones: the non-finite policy needs every rank to agree on it.
        loss = strategy.all_reduce_sum(float(loss_sum)) / num_label_tokens
        if self.router_loss:  # logged apart from the language-model loss, which stays comparable with eval loss
            metrics["router_aux_loss"] = strategy.all_reduce_sum(float(router_sum)) * router_share
        if self.pairs:  # preference metrics over the global batch's pairs (KTO: its answers)
            metrics.update(self.objective.summarise(
                {key: strategy.all_reduce_sum(pair_sums.get(key, 0.0)) for key in self.objective.stat_names},
                num_label_tokens))
        # fp16's loss scaler skips overflowing steps by design; elsewhere an unapplied step means NaN/inf gradients.
        nonfinite = "loss" if not math.isfinite(loss) else (
            "gradient norm" if not applied and cfg.train.precision != "fp16" else None)
        if nonfinite:
            metrics["nonfinite"] = nonfinite
        if self._every(cfg.logger.every_n_steps, self.state.step) or self.state.step in (1, self.total_steps) \
                or nonfinite:
            from trainer.metrics import peak_memory_bytes

            units = "pairs" if self.pairs else "label_tokens"
            metrics.update(loss=loss, grad_norm=grad_norm, **{units: num_label_tokens}, epoch=self.sampler.state.epoch,
                           peak_memory_gib=round(peak_memory_bytes(strategy.device) / 2**30, 3))
            if self.anchor is not None:  # the weights' distance before this step's update (0 at step 1)
                metrics.update({name: float(value.detach()) for name, value in penalty_terms.items()})
        if math.isfinite(loss):
            self.state.first_loss = loss if self.state.first_loss is None else self.state.first_loss
            self.state.last_loss = loss
        return metrics

    def _nonfinite_stops(self, what: str) -> bool:
        """train.nonfinite: `skip` (the strategy did not apply the step; it is counted) or `stop` (nothing of this
        step is saved, so the newest committed checkpoint is the last good state)."""
        step = self.state.step
        if self.config.train.nonfinite == "stop":
            self.logger.info(f"step {step}: non-finite {what}: stopping (train.nonfinite=stop); the last committed "
                             "checkpoint is kept")
            return True
        self.logger.info(f"step {step}: non-finite {what}: step skipped without an update "
                         f"({self.state.skipped_steps} skipped so far; train.nonfinite=skip)")
        return False

    @staticmethod
    def _every(n: int, step: int) -> bool:
        return n > 0 and step % n == 0

    def _early_stop(self, eval_metrics: dict) -> bool:
        """Track the best eval loss; True once `early_stopping_patience` evaluations brought no improvement, or once
        the forgetting check's loss rose past eval.max_forgetting."""
        from trainer.forgetting import forgot_too_much

        cfg = self.config.eval
        reason = forgot_too_much(eval_metrics, cfg.max_forgetting)
        if reason:
            self.logger.info(f"early stopping at step {self.state.step}: {reason}")
            return True
        loss = eval_metrics.get("loss", math.inf)
        if loss < self.state.best_eval_loss - cfg.early_stopping_min_delta:
            self.state.best_eval_loss, self.state.evals_without_improvement = loss, 0
            return False
        self.state.evals_without_improvement += 1
        if cfg.early_stopping_patience and self.state.evals_without_improvement >= cfg.early_stopping_patience:
            self.logger.info(f"early stopping at step {self.state.step}: eval loss has not improved for "
                             f"{self.state.evals_without_improvement} evaluations "
                             f"(best {self.state.best_eval_loss:.4f})")
            return True
        return False

    # --------------------------------------------------------------------------------------- evaluation
    def evaluate(self, step: int, check=None) -> dict:
        """`check()` runs between batches and may raise to stop the evaluation (a preemption request)."""
        from trainer.evaluate import evaluate_loss, generation_metrics
        from trainer.faults import fault_point

        fault_point(f"eval-{step}")
        cfg = self.config
        metrics = evaluate_loss(self.model, self.data.val, self.strategy, cfg.train.micro_batch_size,
                                self.tokenizer.pad_token_id, cfg.eval.max_batches, self.objective, check=check)
        if self.forgetting_rows:
            from trainer.forgetting import add_increase

            kept = evaluate_loss(self.model, self.forgetting_rows, self.strategy, cfg.train.micro_batch_size,
                                 self.tokenizer.pad_token_id, cfg.eval.max_batches, self.objective, check=check)
            metrics.update(forgetting_loss=kept["loss"], forgetting_perplexity=kept["perplexity"])
            add_increase(metrics, self.state.eval_before or metrics)  # before training: the baseline itself, 0
        if cfg.eval.generate_samples and self.data.val_samples:
            samples = self.data.val_samples[:cfg.eval.generate_samples]
            generated, examples = generation_metrics(self.model, self.tokenizer, samples, self.strategy,
                                                     cfg.eval.max_new_tokens, check=check, metrics=cfg.eval.metrics)
            metrics.update(generated)
            self.logger.log_samples(step, examples)
            if examples:
                self.logger.info(f"sample @ step {step}: {examples[0]['prompt']!r} -> {examples[0]['answer']!r} "
                                 f"(reference {examples[0]['reference']!r})")
        if self.pairs and self.data.val_pairs:
            from trainer.evaluate import evaluate_pairs

            metrics.update(evaluate_pairs(self.model, self.objective, self.data.val_pairs,
                                          self.reference["val"] if self.reference else None, self.strategy,
                                          cfg.train.micro_batch_size, self.tokenizer.pad_token_id,
                                          cfg.model.attn_implementation, cfg.eval.max_batches, check=check))
        if metrics:
            self.logger.log_eval(step, metrics)
            if step == 0 or math.isinf(self.state.best_eval_loss):
                self.state.best_eval_loss = min(self.state.best_eval_loss, metrics.get("loss", math.inf))
        return metrics

    # ------------------------------------------------------------------------------------------ outputs
    def save_final(self) -> str:
        """final/: a Hugging Face model dir (full fine-tune) or a PEFT adapter dir, with the tokenizer."""
        from trainer.checkpoint import save_final_model
        from trainer.faults import fault_point

        fault_point("final-save")
        final_dir = os.path.join(self.run_dir, "final")
        save_final_model(self.strategy, self.model, self.tokenizer, final_dir)
        return final_dir

    def _summary(self, status: str, eval_after: dict, final_dir: str, tokens_per_second, peak_memory: int) -> dict:
        from trainer.metrics import device_peak_bytes

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
            "device_peak_bytes": device_peak_bytes(self.strategy.device),  # GPU: with the context, fragmentation
            "model_state_bytes_per_rank": self.state_bytes,
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


# Stopped on a non-finite loss or gradient (train.nonfinite=stop). Not EXIT_REQUEUE: a requeued run would resume
# from the same checkpoint onto the same data, with the same optimizer and LR state, and fail the same way.
EXIT_STOPPED_NONFINITE = 3


def run_training(config: Config, on_exit_code=None) -> int:
    """Run the recipe for a frozen config; rank 0 writes summary.json and the loss curve.

    `on_exit_code(code, message)` runs on every rank before any rank exits with a non-zero code (the worker records
    why there, while torchrun, which tears the job down at the first non-zero exit, still lets it)."""
    from trainer.errors import EXIT_REQUEUE
    from trainer.plots import plot_loss_curve

    started = time.time()
    recipe = Recipe(config)
    try:
        if recipe.strategy.is_main:  # what this run is made from, for `trainer register` (trainer/lineage.py)
            from trainer.checkpoint import remove_stale_temporaries
            from trainer.lineage import write_lineage

            removed = remove_stale_temporaries(config.run.dir)
            if removed:
                recipe.logger.info(f"removed {len(removed)} half-written file(s) an earlier start left when it was "
                                   f"killed: {', '.join(removed)}")
            write_lineage(config.run.dir, config, recipe.data.fingerprint)
        summary = recipe.train()
        summary["wall_seconds"] = round(time.time() - started, 1)
        if recipe.strategy.is_main:
            write_summary(config.run.dir, summary)
            if config.logger.plot:
                plot_loss_curve(os.path.join(config.run.dir, "metrics.jsonl"),
                                os.path.join(config.run.dir, "loss_curve.png"), title=config.run.name)
            _print_result(recipe, summary)
            if config.registry.auto and summary["status"] == "completed":
                _register(config)
        # A preempted run checkpointed and asks to be requeued; resume=auto continues it from that checkpoint.
        code = {"preempted": EXIT_REQUEUE, "stopped_nonfinite": EXIT_STOPPED_NONFINITE}.get(summary["status"], 0)
        if code and on_exit_code is not None:
            on_exit_code(code, _stop_message(recipe, summary))
        recipe.strategy.barrier()  # no rank exits (and triggers the teardown) before every rank has recorded
    finally:
        recipe.close()
    return code


def _register(config: Config) -> None:
    """registry.auto: the finished run as a new registered version. A gate that fails (or a registry that cannot
    be reached) is reported, not raised: the run itself completed and its final/ is intact."""
    from trainer.errors import UserError
    from trainer.gate import parse_requirement
    from trainer.registry import register_run, shown_uri, tracking_uri

    uri = tracking_uri(config.registry.tracking_uri, config.paths.runs_dir)
    name = config.registry.name or config.run.name
    try:
        done = register_run(config.run.dir, name, uri, aliases=list(config.registry.aliases),
                            requirements=[parse_requirement(text) for text in config.registry.require])
    except UserError as err:
        print(f"registry.auto: {err}", flush=True)
        return
    except Exception as err:  # noqa: BLE001 -- a server that is down must not turn a finished run into a failure
        print(f"registry.auto: not registered ({type(err).__name__}: {str(err).splitlines()[0]}); register the run "
              f"later with `trainer register {config.run.dir} --name {name}`", flush=True)
        return
    aliases = f" (alias {', '.join(done.aliases)})" if done.aliases else ""
    print(f"registered {done.name} version {done.version}{aliases} in {shown_uri(uri)}", flush=True)


def _stop_message(recipe: Recipe, summary: dict) -> str:
    if summary["status"] == "preempted":
        return (f"preempted at step {summary['steps']}: checkpoint saved in {recipe.run_dir}/checkpoints; run the same "
                "command again (resume=auto) to continue")
    return (f"stopped at step {summary['steps']}: non-finite loss or gradient norm (train.nonfinite=stop); the last "
            f"committed checkpoint in {recipe.run_dir}/checkpoints is intact (what to do next: docs/checkpoints.md)")


def _figure(value) -> str:
    """A metric for the end-of-run table: 4 decimals, thousands separated, large values in 4 significant digits."""
    if not isinstance(value, (int, float)):
        return "-"
    return f"{value:,.4f}" if abs(value) < 1e6 else f"{value:.4g}"


def result_table(before: dict, after: dict) -> list[str]:
    """The end-of-run table: one row per eval metric, before and after training, right-aligned figures."""
    if not (before or after):
        return []
    keys = sorted(set(before) | set(after))
    cells = [(key, _figure(before.get(key)), _figure(after.get(key))) for key in keys]
    width = max(len("metric"), *map(len, keys)) + 2
    column = max(len("before"), *(max(len(b), len(a)) for _, b, a in cells)) + 2  # never run figures together
    return [f"{'metric':<{width}}{'before':>{column}}{'after':>{column}}",
            *(f"{key:<{width}}{b:>{column}}{a:>{column}}" for key, b, a in cells)]


def _print_result(recipe: Recipe, summary: dict) -> None:
    if summary["status"] in ("preempted", "stopped_nonfinite"):
        print(f"run {_stop_message(recipe, summary)}", flush=True)
        return
    before, after = summary["eval_before"], summary["eval_after"]
    lines = [f"run {summary['status']}: {summary['steps']} steps in {summary['wall_seconds']} s; "
             f"train loss {summary['train_loss_first']:.4f} -> {summary['train_loss_last']:.4f}"]
    lines += result_table(before, after)
    lines.append(f"run dir: {recipe.run_dir}  (summary.json, metrics.jsonl, loss_curve.png, final/)")
    print("\n".join(lines), flush=True)
