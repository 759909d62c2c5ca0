"""Forgetting check: the loss on data a fine-tune should leave alone (general text, an earlier task), measured with
every evaluation beside the task's own metrics.

Fine-tuning buys a task at the price of what the base model knew; this makes the price visible. `eval.forgetting_path`
names the data (any format `data.format` accepts; `eval.forgetting_format`, default text); its loss and perplexity
appear as `forgetting_loss` / `forgetting_perplexity` in metrics.jsonl and in summary.json's eval before/after, and
`forgetting_increase` is the loss's relative rise since the evaluation before training. With
`eval.max_forgetting=X` the run stops early once that rise exceeds X (e.g. 0.1: ten percent).
"""

from __future__ import annotations

import dataclasses


def build_forgetting_rows(config, tokenizer) -> list:
    """Every record of eval.forgetting_path, tokenised as training would, one sample per row; [] when unset."""
    eval_cfg = config.eval
    if not eval_cfg.forgetting_path:
        return []
    return general_rows(config, tokenizer, eval_cfg.forgetting_path, eval_cfg.forgetting_format,
                        eval_cfg.forgetting_max_samples)


def general_rows(config, tokenizer, path: str, data_format: str, max_samples: int) -> list:
    """The records of a file that is not training data (the forgetting check's, EWC's Fisher data), tokenised as
    training would, one sample per row: its own records only, never split, de-duplicated or mixed with replay."""
    from trainer.config.schema import ColumnsConfig, ReplayConfig
    from trainer.data import build_datasets

    data_cfg = dataclasses.replace(
        config.data, path=path, sources=[], format=data_format, columns=ColumnsConfig(), val_path=None,
        val_ratio=0.0, test_path=None, test_ratio=0.0, packing=False, max_samples=max_samples, dedup="none",
        strict=False, replay=ReplayConfig())
    table = build_datasets(data_cfg, tokenizer, config.seed, cache_dir=config.paths.cache_dir).train.table
    return [table.sample(i) for i in range(len(table))]


def add_increase(metrics: dict, before: dict) -> None:
    """forgetting_increase: the forgetting loss's relative change since the evaluation before training."""
    baseline = before.get("forgetting_loss")
    if baseline and "forgetting_loss" in metrics:
        metrics["forgetting_increase"] = metrics["forgetting_loss"] / baseline - 1.0


def forgot_too_much(metrics: dict, limit: float) -> str | None:
    """Why to stop (a log line) when the rise exceeds `limit` (> 0), else None."""
    increase = metrics.get("forgetting_increase")
    if limit > 0 and increase is not None and increase > limit:
        return (f"the loss on eval.forgetting_path rose {increase:.1%} since before training, more than "
                f"eval.max_forgetting={limit:g}")
    return None
