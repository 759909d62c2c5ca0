"""`trainer eval SOURCE --data FILE | --split val|test [--adapter NAME=PATH ...] [--base-too]`: a model, an adapter
or a run scored on a data file, or on a run's own held-out split, side by side.

The targets load as `trainer generate` loads them (launch/generate.py): one base model, each adapter attached under
its name and made active in turn, so a base and its fine-tunes are compared on one copy of the weights. The data
file is read by the project's own parsers (any supported format; bad records are one line naming file and line) and
rendered with the run's template, as training rendered it. `--split` takes the records the run held out instead
(trainer/data/pipeline.py held_out_examples: the run's files, de-duplication and seeded split). For each target:

* loss and perplexity over the answers' tokens (teacher forcing; the loss training logs as eval_loss);
* greedy answers to the prompts against the references: exact match and token F1 (as in-run evaluation), BLEU
  (sacrebleu's corpus BLEU) and ROUGE-1/2/L F-measures (rouge-score, stemmed);
* latency: time to the first new token (median over up to 5 prompts, one at a time) and decoding throughput
  (prompts x decoded positions per second over all batches).

Results print as one table (a column per target) and, with --json FILE, as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from launch.cli_args import OneLineParser
from trainer.errors import UserError

DESCRIPTION = """\
SOURCE is a model dir or a run dir (its final/: the trained model, or an adapter attached to its base under the
run dir's name); each --adapter NAME=PATH (an adapter dir or run dir) is scored too, and --base-too adds the base
alone. --data is any file `trainer train` reads (alpaca, chat, sharegpt, completion, ... with --format, else
detected); or --split val|test takes the records a run dir's training held out (its data.val_ratio/test_ratio
split, or its val/test file). The records are rendered with the run's template (or --template) and their last
answers are the references.

--harness runs EleutherAI's lm-evaluation-harness tasks on the same targets (any task name on a connected machine;
your own task YAML with local data through --harness-include DIR); its metrics join the table as TASK/METRIC.

e.g. trainer eval runs/facts-lora --data facts-val.jsonl --base-too --json scores.json
     trainer eval runs/facts-lora --split test --base-too
     trainer eval runs/facts-lora --base-too --harness my_task --harness-include my-tasks/
"""
LATENCY_PROMPTS = 5



def build_parser() -> argparse.ArgumentParser:
    from launch.generate import TEMPLATES

    parser = OneLineParser(prog="trainer eval", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a model dir or a run dir")
    parser.add_argument("--data", help="a data file in any supported format")
    parser.add_argument("--split", choices=("val", "test"),
                        help="instead of --data: the run's own held-out split (SOURCE must be a run dir)")
    parser.add_argument("--format", default="auto", help="the data file's format (default: detected)")
    parser.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                        help="also score an adapter (an adapter dir or run dir) under NAME; repeatable")
    parser.add_argument("--base-too", action="store_true", help="also score the base model, adapters off")
    parser.add_argument("--template", choices=TEMPLATES, default="auto",
                        help="prompt template (auto: the run's data.template, else the tokenizer's chat template)")
    parser.add_argument("--max-samples", type=int, default=0, help="score the first N records only (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-seq-len", type=int, default=2048, help="longer samples are truncated for the loss")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--harness", metavar="TASK[,TASK]",
                        help="also run lm-evaluation-harness tasks on every target (extra 'harness'); then --data "
                             "and --split are optional")
    parser.add_argument("--harness-include", metavar="DIR", help="task YAML files of your own (local data)")
    parser.add_argument("--nproc-per-node", type=int, default=1, metavar="N",
                        help="shard the targets over N ranks of this machine with FSDP2 (gloo on CPU, NCCL on GPUs): "
                             "for models one device cannot hold; the figures equal one process's")
    parser.add_argument("--json", dest="json_path", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run Python code that the model dir ships (auto_map); off unless you trust its source")
    return parser


class _OneProcess:
    """The strategy interface trainer/evaluate.py uses, for one process on one device."""

    rank, world_size = 0, 1

    def __init__(self, device):
        import contextlib

        self.device = device
        self.autocast = contextlib.nullcontext

    @staticmethod
    def all_reduce_sum(value):
        return value


def read_examples(path: str, fmt: str, max_samples: int):
    """(examples, detected formats): the file's records parsed by the project's parsers, before any model loads; a
    missing file, a bad record or a file without prompts and answers is one line at once."""
    from trainer.config.schema import DataConfig
    from trainer.data.pipeline import parse_sources
    from trainer.errors import ConfigError

    if not os.path.isfile(path):
        raise UserError(f"eval: --data {path!r} does not exist")
    try:
        cfg = DataConfig(path=path, format=fmt)
    except ConfigError as err:
        raise UserError(f"eval: --format: {err}") from None
    parsed = parse_sources(cfg)
    examples = _scorable([example for source in parsed.examples for example in source], path)
    return (examples[:max_samples] if max_samples else examples), parsed.formats


def read_split(run_dir: str, split: str, max_samples: int):
    """(examples, formats) of a run dir's held-out split, as its training held them out; one line when the run dir
    has no config, its data files are gone, or the split is empty."""
    from trainer.config.frozen import FROZEN_NAME, load_frozen
    from trainer.data.pipeline import held_out_examples

    if not os.path.isfile(os.path.join(run_dir, FROZEN_NAME)):
        raise UserError(f"eval: --split needs a run dir ({run_dir!r} has no {FROZEN_NAME}): give --data FILE instead")
    config = load_frozen(run_dir)
    examples, formats = held_out_examples(config.data, config.seed, split)
    where = f"{run_dir}'s {split} split"
    if not examples:
        ratio, path = getattr(config.data, f"{split}_ratio"), getattr(config.data, f"{split}_path")
        raise UserError(f"eval: {where} is empty (data.{split}_ratio={ratio:g}, data.{split}_path={path}): train "
                        f"with data.{split}_ratio > 0, or give --data FILE")
    examples = _scorable(examples, where)
    return (examples[:max_samples] if max_samples else examples), formats


def _scorable(examples: list, where: str) -> list:
    """The records with a prompt and an answer (the references); none is one line."""
    examples = [example for example in examples if example.messages or any(not trained for _, trained in example.raw)]
    if not examples:
        raise UserError(f"eval: {where} has no record with a prompt and an answer to score (expected instruction, "
                        "conversation or prompt/completion records; plain text has no reference answer)")
    return examples


def render_samples(examples, template, tokenizer):
    """The records rendered as training renders them: [Sample] with prompt and reference."""
    from trainer.data.templates import render_example

    samples = [render_example(example, template, tokenizer.bos_token) for example in examples]
    return [sample for sample in samples if sample.prompt and sample.reference]


def answer_all(model, tokenizer, prompts: list[str], args, strategy) -> list[str]:
    """Greedy answers in the prompts' order; on several ranks each answers its share (in lockstep: a rank with no
    prompts left answers a stand-in, since a sharded forward needs every rank) and the answers are gathered."""
    from trainer.evaluate import _rank_share, greedy_generate

    answered: list[tuple[int, str]] = []
    for batch in _rank_share(list(enumerate(prompts)), strategy.rank, strategy.world_size, args.batch_size):
        texts = [prompt for _, prompt in batch] or prompts[:1]
        answers = greedy_generate(model, tokenizer, texts, args.max_new_tokens, strategy.device, strategy.autocast)
        answered += [(index, answer) for (index, _), answer in zip(batch, answers)]
    if strategy.world_size > 1:
        import torch.distributed as dist

        shares = [None] * strategy.world_size
        dist.all_gather_object(shares, answered)
        answered = [pair for share in shares for pair in share]
    return [answer for _, answer in sorted(answered)]


def score_target(model, tokenizer, samples, args, strategy) -> dict:
    """Every metric for the model as it is now (the active adapter, or none)."""
    from trainer.data.encode import encode_samples
    from trainer.evaluate import evaluate_loss, greedy_generate
    from trainer.text_metrics import score_answers

    table, _, _, _ = encode_samples(samples, tokenizer, args.max_seq_len, train_on_inputs=False)
    rows = [table.sample(i) for i in range(len(table))]
    metrics = dict(evaluate_loss(model, rows, strategy, args.batch_size, tokenizer.pad_token_id))
    prompts = [sample.prompt for sample in samples]
    started = time.perf_counter()
    answers = answer_all(model, tokenizer, prompts, args, strategy)
    decoding = time.perf_counter() - started
    metrics.update(score_answers(answers, [sample.reference for sample in samples]))
    first_token = []
    for prompt in prompts[:LATENCY_PROMPTS]:
        started = time.perf_counter()
        greedy_generate(model, tokenizer, [prompt], 1, strategy.device, strategy.autocast)
        first_token.append(time.perf_counter() - started)
    metrics["time_to_first_token_s"] = statistics.median(first_token)
    metrics["decode_tokens_per_second"] = len(prompts) * args.max_new_tokens / max(decoding, 1e-9)
    return {"metrics": metrics, "answers": answers}


def score_all(model, tokenizer, samples, names: list[str], args, strategy) -> dict:
    """{target name: {"metrics": ..., "answers": [...]}} for the base (when asked, or alone) and each adapter."""
    import contextlib

    model.eval()
    results = {}
    if args.base_too or not names:
        with model.disable_adapter() if names else contextlib.nullcontext():
            results["base"] = score_target(model, tokenizer, samples, args, strategy)
    for name in names:
        model.set_adapter(name)
        results[name] = score_target(model, tokenizer, samples, args, strategy)
    return results


def place(model, args):
    """(model, strategy): on this process's device, or sharded over the ranks of --nproc-per-node."""
    from launch.score_sharded import is_worker, shard

    if is_worker():
        return shard(model)
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), _OneProcess(device)


def render_table(results: dict) -> str:
    from trainer.recipe import _figure

    names = list(results)
    keys = list(next(iter(results.values()))["metrics"])
    cells = [[key, *(_figure(results[name]["metrics"].get(key)) for name in names)] for key in keys]
    header = ["metric", *names]
    widths = [max(len(str(row[i])) for row in [header, *cells]) + 2 for i in range(len(header))]
    lines = [header[0].ljust(widths[0]) + "".join(h.rjust(w) for h, w in zip(header[1:], widths[1:]))]
    lines += [row[0].ljust(widths[0]) + "".join(c.rjust(w) for c, w in zip(row[1:], widths[1:])) for row in cells]
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from launch.generate import final_dir, load_models, parse_adapters

    args = build_parser().parse_args(argv)
    for name in ("max_new_tokens", "max_seq_len", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"eval: --{name.replace('_', '-')} must be >= 1")
    if args.max_samples < 0:
        raise UserError("eval: --max-samples must be >= 0 (0: every record)")
    if not os.path.isdir(args.source):
        raise UserError(f"eval: {args.source!r} is not a model dir or run dir")
    final_dir(args.source)  # an unfinished run or truncated weights: one line now, before any library loads
    adapters = parse_adapters(args.adapter)
    if args.data and args.split:
        raise UserError("eval: give --data FILE or --split val|test, not both")
    if args.harness_include and not args.harness:
        raise UserError("eval: --harness-include adds task definitions for --harness TASK; name the task too")
    if not (args.data or args.split or args.harness):
        raise UserError("eval: give --data FILE, --split val|test or --harness TASK")
    if args.nproc_per_node < 1:
        raise UserError("eval: --nproc-per-node must be >= 1")
    if args.nproc_per_node > 1 and args.harness:
        raise UserError("eval: --harness runs in one process (lm-evaluation-harness drives the model itself): drop "
                        "--nproc-per-node, or score --data/--split on several ranks and the harness separately")
    harness = None
    if args.harness:  # the package and task names checked before any model loads
        from launch.harness import check_harness, parse_tasks

        tasks = parse_tasks(args.harness)
        harness = tasks, check_harness(tasks, args.harness_include)
    examples = None
    if args.split:
        examples, formats = read_split(args.source, args.split, args.max_samples)
        data_label = f"{args.source} ({args.split} split)"
    elif args.data:
        examples, formats = read_examples(args.data, args.format, args.max_samples)
        data_label = args.data
    from launch.score_sharded import is_worker, relaunch

    if args.nproc_per_node > 1 and not is_worker():  # everything checked: the ranks start from here
        return relaunch(argv, args.nproc_per_node)
    model, tokenizer, names, run_config = load_models(args.source, adapters, args.trust_remote_code)
    if tokenizer.pad_token_id is None:  # batches are padded; the padding is masked out of every metric
        tokenizer.pad_token = tokenizer.eos_token
    model, strategy = place(model, args)
    results: dict = {}
    scored = 0
    if examples is not None:
        results, scored = score_examples(model, tokenizer, examples, formats, data_label, names, run_config, args,
                                         strategy)
    if harness is not None:
        from launch.harness import run_harness

        tasks, manager = harness
        scores = run_harness(model, tokenizer, names, args.base_too, tasks, manager, args.max_samples,
                             args.batch_size)
        for target, metrics in scores.items():
            results.setdefault(target, {"metrics": {}, "answers": []})["metrics"].update(metrics)
        print(f"lm-evaluation-harness: {', '.join(tasks)}" + (f" (first {args.max_samples} documents of each)"
                                                               if args.max_samples else ""))
    print(render_table(results))
    if args.json_path and strategy.rank == 0:
        write_report(args, results, scored)
    sys.stdout.flush()
    if strategy.world_size > 1:
        strategy.close()
    return 0


def score_examples(model, tokenizer, examples, formats, data_label: str, names, run_config, args,
                   strategy) -> tuple[dict, int]:
    """The project's own metrics on the data file or split, rendered with the run's (or the chosen) template."""
    from launch.generate import choose_template

    if args.template == "auto" and not run_config.get("data"):
        # No run to follow: the template `trainer train` would pick for this data and tokenizer.
        from trainer.data.templates import build_template

        template = build_template("auto", tokenizer, formats)
    else:
        template = choose_template(args.template, tokenizer, run_config)
    samples = render_samples(examples, template, tokenizer)
    if not samples:
        raise UserError(f"eval: no record of {data_label} renders to a prompt and an answer with this template")
    results = score_all(model, tokenizer, samples, names, args, strategy)
    print(f"{len(samples)} samples from {data_label}; greedy answers of up to {args.max_new_tokens} tokens")
    for result in results.values():
        result["answers"] = [{"prompt": s.prompt, "reference": s.reference, "answer": a}
                             for s, a in zip(samples, result["answers"])]
    return results, len(samples)


def write_report(args, results: dict, scored: int) -> None:
    report = {"data": os.path.abspath(args.data) if args.data else None, "split": args.split,
              "samples": scored, "max_new_tokens": args.max_new_tokens,
              "harness": args.harness,
              "targets": {name: {"metrics": result["metrics"], "answers": result["answers"]}
                          for name, result in results.items()}}
    tmp = f"{args.json_path}.tmp"
    with open(tmp, "w") as fh:
        json.dump(report, fh, indent=2)
    os.replace(tmp, args.json_path)
    print(f"results: {args.json_path}")
