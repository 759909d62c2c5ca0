"""The data pipeline: sources -> formats/templates -> token ids with masked labels -> batches."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainer.config.schema import DataConfig
from trainer.data.encode import EncodedSample, EncodeStats, encode_samples
from trainer.data.formats import Sample, format_records
from trainer.data.sources import read_records
from trainer.data.templates import get_template
from trainer.errors import DataError


@dataclass
class Datasets:
    train: list[EncodedSample]
    val: list[EncodedSample]
    val_samples: list[Sample]  # the untokenised validation samples, for generation metrics
    train_stats: EncodeStats
    num_train_records: int


def _split(samples: list[Sample], val_ratio: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded split: the same seed always holds out the same records."""
    if val_ratio <= 0 or len(samples) < 2:
        return samples, []
    order = np.random.default_rng([seed, 7919]).permutation(len(samples))
    num_val = max(1, int(round(len(samples) * val_ratio)))
    val_idx = set(order[:num_val].tolist())
    return ([s for i, s in enumerate(samples) if i not in val_idx], [s for i, s in enumerate(samples) if i in val_idx])


def build_datasets(cfg: DataConfig, tokenizer, seed: int) -> Datasets:
    template = get_template(cfg.template)
    samples = format_records(read_records(cfg.path), cfg.format, template)
    if cfg.max_samples:
        samples = samples[:cfg.max_samples]
    if cfg.val_path:
        train_samples = samples
        val_samples = format_records(read_records(cfg.val_path), cfg.format, template)
    else:
        train_samples, val_samples = _split(samples, cfg.val_ratio, seed)
    train, stats = encode_samples(train_samples, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, cfg.truncation)
    val, _ = encode_samples(val_samples, tokenizer, cfg.max_seq_len, cfg.train_on_inputs, cfg.truncation)
    if not train:
        raise DataError(cfg.path, None, "no usable training records after formatting and truncation")
    return Datasets(train, val, val_samples, stats, len(train_samples))
