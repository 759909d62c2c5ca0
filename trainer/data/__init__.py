"""The data pipeline: sources -> formats -> templates and label masks -> token ids -> packed rows -> batches.

`build_datasets(cfg, tokenizer, seed, cache_dir)` is what the recipe calls; `collate` (loader.py) turns
rows into model inputs. Modules, in pipeline order: readers/sources (records with file and line), formats
(records -> examples), hygiene (dedup, splits, weights), templates (examples -> text segments, trained or
not), encode (token table), cache, packing (rows), loader (sampler, collate), report (counts, the table of
`trainer data check`). Nothing heavy is imported until data is built.
"""

from trainer.data.pipeline import Datasets, build_datasets, parse_sources, prepare_datasets

__all__ = ["Datasets", "build_datasets", "parse_sources", "prepare_datasets"]
