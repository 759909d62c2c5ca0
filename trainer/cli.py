"""The `trainer` command: a thin dispatcher to subcommands.

Nothing heavy is imported here or at the top of the subcommand modules, so `trainer --help` and config
errors answer in about a second. User errors print one line and exit with code 2.
"""

from __future__ import annotations

import os
import sys

from trainer.errors import EXIT_USER_ERROR, UserError

USAGE = """\
usage: trainer <command> [args]

Fine-tune large language models: one CPU process to many GPUs and nodes.

commands:
  train [OVERRIDES]     compose the config (Hydra), validate, freeze it into the run dir, and train
                        e.g. trainer train model.path=/models/llama data.path=data.jsonl peft=lora
                             trainer train --cfg job           (print the composed config)
                             trainer train -m optim.lr=1e-4,2e-4  (a sweep: one run dir per point)
                             trainer train launcher=slurm launcher.nodes=2  (submit to Slurm; docs/slurm.md)
                             trainer train my.yaml optim.lr=1e-4  (your own config file, then overrides)
                             trainer train data.path=pairs.jsonl objective.name=dpo  (or ipo, simpo, orpo, kto;
                                 preference tuning on pairs or labelled answers: docs/preference.md)
  data check [OVERRIDES]
                        load, validate and tokenise the data a run would use; print counts, lengths, packing
  plan [OVERRIDES] [--json]
                        per-GPU memory of the configured run and what fits where (reads config.json only)
                        e.g. trainer plan model=llama-3.1-70b hardware.gpu_memory_gb=80 launcher.nproc_per_node=8
  sweep summary DIR     a CSV + Markdown table of a sweep's points (overrides, status, metrics; best marked)
  export RUN_DIR|CHECKPOINT --to hf|adapter|merged --out DIR
                        a checkpoint (any strategy or world size) as a Hugging Face model, PEFT adapter or merged model
  export RUN_DIR|CHECKPOINT --to gguf|gguf-model --out FILE.gguf [--gguf-dtype f16|q8_0|f32]
                        for llama.cpp: a LoRA adapter (--lora FILE) or the (merged) model as one GGUF file
  generate SOURCE [PROMPT ...] [--adapter NAME=PATH ...] [--prompts FILE] [--temperature T --top-p P --seed N]
                        answers from a model or run (greedy, or sampled with a seed), switching between several
                        adapters on one base; --chat: a multi-turn chat on stdin/stdout with one model or adapter
  eval SOURCE --data FILE|--split val|test|--harness TASK [--adapter NAME=PATH ...] [--base-too] [--json FILE]
       [--nproc-per-node N]
                        score a model, adapter or run (and others beside it) on a data file or the run's held-out
                        split: loss, perplexity, exact match, token F1, BLEU, ROUGE-1/2/L, time to first token,
                        decoding tokens/s; --harness TASK: lm-evaluation-harness tasks on the same models
  register RUN --name NAME [--alias A] [--require "eval.exact_match>=0.6" ...]
                        a finished run's adapter or model as a new version in the model registry (MLflow; embedded
                        SQLite store in runs/registry by default), with lineage; refused if a --require gate fails
  registry list|show|promote
                        registered versions, their lineage and metrics; promote a version to an alias behind a gate
  serve BASE [--adapter NAME=RUN|registry:NAME@ALIAS ...] [--port 8000]
                        an OpenAI-compatible server (chat completions, completions, streaming) for one base model
                        and its adapters, each chosen by the request's `model`: llama.cpp on CPU, vLLM on GPUs

Run `trainer <command> --help` for a command's options. Config groups and keys: README.md.
"""


def _commands() -> dict:
    # Imported on use so that one subcommand's dependencies never slow another down.
    def train(argv: list[str]) -> int:
        from trainer.preemption import LAUNCHER_SIGNALS, watch

        # First: a SIGTERM/SIGINT/SIGUSR1 from here on asks the run to stop with exit 85 (docs/checkpoints.md)
        # rather than killing this process half-way; launch/train.py lets go again for a Slurm submission.
        watch(LAUNCHER_SIGNALS)
        from trainer.cuda_allocator import use_expandable_segments

        # Before anything touches CUDA: `single` on one process trains in this process (launch/local.py), and the
        # launcher's workers inherit the setting.
        use_expandable_segments()
        from launch.train import main as train_main

        return train_main(argv)

    def data(argv: list[str]) -> int:
        from launch.data_check import main as data_main

        return data_main(argv)

    def plan(argv: list[str]) -> int:
        from launch.plan import main as plan_main

        return plan_main(argv)

    def sweep(argv: list[str]) -> int:
        from launch.sweep import main as sweep_main

        return sweep_main(argv)

    def export(argv: list[str]) -> int:
        from launch.export import main as export_main

        return export_main(argv)

    def generate(argv: list[str]) -> int:
        from launch.generate import main as generate_main

        return generate_main(argv)

    def evaluate(argv: list[str]) -> int:
        from launch.score import main as eval_main

        return eval_main(argv)

    def register(argv: list[str]) -> int:
        from launch.register import register_main

        return register_main(argv)

    def registry(argv: list[str]) -> int:
        from launch.register import registry_main

        return registry_main(argv)

    def serve(argv: list[str]) -> int:
        from launch.serve import main as serve_main

        return serve_main(argv)

    return {"train": train, "data": data, "plan": plan, "sweep": sweep, "export": export, "generate": generate,
            "eval": evaluate, "register": register, "registry": registry, "serve": serve}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = _commands()
    if not argv or argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] in ("-V", "--version"):
        from trainer import __version__

        print(f"trainer {__version__}")
        return 0
    from trainer.quiet import silence_known_harmless_messages

    silence_known_harmless_messages()
    command = commands.get(argv[0])
    if command is None:
        sys.stderr.write(f"trainer: unknown command {argv[0]!r}; commands: {', '.join(commands)}\n")
        return EXIT_USER_ERROR
    try:
        return int(command(argv[1:]) or 0)
    except BrokenPipeError:  # `trainer eval ... | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except UserError as err:
        sys.stderr.write(f"trainer: {err}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("trainer: interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
