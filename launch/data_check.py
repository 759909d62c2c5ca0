"""`trainer data check [OVERRIDES]`: compose and validate the config as `trainer train` would, then load,
validate, format and tokenise exactly what training would, and print what happened to the data.

Records are parsed before the tokenizer is loaded, so a bad record is reported in about a second. The
tokenised result goes into the same cache that training reads, so a check also warms the cache.
Exit code 0 when the data can train with this config; 2 with one line when it cannot.
"""

from __future__ import annotations

import sys

from trainer.errors import EXIT_USER_ERROR, DataError

USAGE = """\
usage: trainer data check [my.yaml] [OVERRIDES] [-cd DIR] [-cn NAME]

Load, validate, format and tokenise the data a `trainer train` run with the same overrides would use, then
print records per source (kept, skipped, duplicates, held out, truncated, dropped), token-length percentiles,
packing efficiency and two samples with their trained tokens between [[ and ]]. Exits 0 when the data is usable.

  my.yaml    your own config file, composed over the defaults like the overrides (README: your own config file)
  -cd DIR    add DIR to the config search path (your own experiment/, model/ ... options); -cn NAME: primary config

e.g. trainer data check data.path=my.jsonl data.format=chat
     trainer data check data.path=dolly.jsonl data.columns.input=context data.columns.output=response
     trainer data check data.path=null 'data.sources=[{path: a.json}, {path: b.jsonl, format: chat, weight: 2}]'
"""
NUM_SHOWN_SAMPLES = 2


def compose(overrides: list[str]):
    """The validated `Config` that `trainer train OVERRIDES` would freeze (Hydra's compose API: no run dir)."""
    from launch.compose import compose_train_config
    from trainer.config.validate import to_config

    return to_config(compose_train_config(overrides))


def _shown_samples(data, tokenizer) -> list[str]:
    """The first training sample of each of the first two sources (the first two samples of a single source)."""
    from trainer.data.report import render_trained_tokens

    table = data.train.table
    first_of: dict[int, int] = {}
    for index, source in enumerate(data.train_origin.sources.tolist()):
        first_of.setdefault(source, index)
    picks = sorted(first_of.values())[:NUM_SHOWN_SAMPLES]
    for index in range(len(table)):  # one source: its first samples
        if len(picks) >= NUM_SHOWN_SAMPLES:
            break
        if index not in picks:
            picks.append(index)
    shown = []
    for number, index in enumerate(picks, start=1):
        sample = table.sample(index)
        text = render_trained_tokens(sample.input_ids, sample.labels, tokenizer)
        body = "\n".join(f"  | {line}" for line in text.split("\n"))
        shown.append(f"sample {number} ({data.train_origin.where(index)}): {len(sample.input_ids)} tokens, "
                     f"{sample.num_label_tokens} trained (between [[ and ]])\n{body}")
    return shown


def run(overrides: list[str]) -> int:
    from trainer.data import parse_sources, prepare_datasets
    from trainer.data.packing import padding_efficiency
    from trainer.data.report import format_report
    from trainer.model import load_tokenizer
    from trainer.preflight import check_tokenizer_files

    config = compose(overrides)
    check_tokenizer_files(config.model)
    from trainer.objectives import UNPAIRED, pair_mode

    pairs = pair_mode(config.objective)
    # Bad records fail here, before the tokenizer is loaded.
    parsed = parse_sources(config.data, keep_undesirable=pairs == UNPAIRED)
    tokenizer = load_tokenizer(config.model)
    data = prepare_datasets(config.data, tokenizer, config.seed, config.paths.cache_dir, parsed=parsed, pairs=pairs)
    lengths = data.train.table.lengths[data.train.slots] if len(data.train.slots) else []
    micro = config.train.micro_batch_size
    print(format_report(data.report, padding_efficiency(lengths, micro, config.seed), micro))
    for block in _shown_samples(data, tokenizer):
        print()
        print(block)
    print()
    if not len(data.train):
        where = config.data.path or config.data.sources[0].path
        raise DataError(where, None, "no usable training records after formatting and truncation (expected at least "
                        "one record with something to train on; see the counts above)")
    if len(data.train) < config.train.global_batch_size:
        from trainer.errors import ConfigError

        raise ConfigError("train.global_batch_size", f"{config.train.global_batch_size} is larger than the "
                          f"{len(data.train)} training rows: lower it, or add data")
    print(f"data is usable: {len(data.train):,} training rows; {len(data.val):,} validation samples")
    return 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else EXIT_USER_ERROR
    if argv[0] != "check":
        sys.stderr.write(f"trainer: unknown data command {argv[0]!r}; use `trainer data check [OVERRIDES]`\n")
        return EXIT_USER_ERROR
    if any(arg in ("-h", "--help") for arg in argv[1:]):
        sys.stdout.write(USAGE)
        return 0
    return run(argv[1:])
