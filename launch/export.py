"""`trainer export SOURCE --to hf|adapter|merged --out DIR`: a checkpoint or run as a Hugging Face artefact.

Argument errors are one line and exit code 2, like every user error (argparse's own multi-line usage dump is
replaced). The export itself lives in trainer/export/.
"""

from __future__ import annotations

import argparse

from launch.cli_args import OneLineParser

DESCRIPTION = """\
Export a run dir (its final/ if finished, else its newest committed checkpoint), a checkpoint dir
(RUN/checkpoints/step-N, from any strategy and world size) or a final/ dir:
  --to hf       a full fine-tune as a Hugging Face model (safetensors shards + index, config, tokenizer)
  --to adapter  a PEFT run's adapter dir (adapter_config.json, adapter_model.safetensors, tokenizer)
  --to merged   a LoRA/DoRA/QLoRA/IA3 adapter merged into its base model (model.path of the run)
  --to gguf     a LoRA/QLoRA adapter as a GGUF LoRA adapter for llama.cpp (--out FILE.gguf)
  --to gguf-model  a Llama-family model (merged, if PEFT) as one GGUF file (--gguf-dtype f16|q8_0|f32)
"""



def _size(text: str) -> int:
    units = {"KB": 1000, "MB": 1000**2, "GB": 1000**3, "KIB": 1024, "MIB": 1024**2, "GIB": 1024**3, "B": 1}
    upper = text.strip().upper()
    for unit in sorted(units, key=len, reverse=True):
        if upper.endswith(unit):
            try:
                return int(float(upper[:-len(unit)]) * units[unit])
            except ValueError:
                break
    raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 5GB or 500MB")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="trainer export", description=DESCRIPTION,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="a run dir, a checkpoint dir (RUN/checkpoints/step-N) or a final/ dir")
    parser.add_argument("--to", required=True, choices=["hf", "adapter", "merged", "gguf", "gguf-model"],
                        help="what to write (gguf: a LoRA adapter for llama.cpp; gguf-model: a merged model, one file)")
    parser.add_argument("--gguf-dtype", choices=["f32", "f16", "q8_0"],
                        help="GGUF weights (adapter: f32 default, or f16; model: f16 default, q8_0 or f32)")
    parser.add_argument("--out", required=True, help="the output dir (must not exist, or be empty)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="weights dtype (auto: as trained: fp32 master weights; merged: the base's training dtype)")
    parser.add_argument("--max-shard-size", type=_size, default=_size("5GB"),
                        help="largest safetensors file for --to hf (default 5GB)")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.to.startswith("gguf"):  # trainer/export_gguf: stage through the export below, then write GGUF
        from trainer.export_gguf.from_run import export_gguf

        report = export_gguf(args.source, args.to, args.out, args.gguf_dtype)
        print(f"exported {report['source']}\n  as {args.to} to {report['out']}: {report['bytes'] / 1024**2:.1f} MiB "
              f"in {report['seconds']} s", flush=True)
        return 0
    from trainer.export import export

    report = export(args.source, args.to, args.out, dtype=args.dtype, max_shard_bytes=args.max_shard_size)
    mib = 1024**2
    largest = report.get("largest_tensor_bytes")
    growth = (report["peak_rss_bytes"] - report["rss_before_bytes"]) / mib
    memory = (f"peak memory {report['peak_rss_bytes'] / mib:.0f} MiB, {growth:.0f} MiB above the start of the export"
              + (f" (largest tensor {largest / mib:.1f} MiB)" if largest else ""))
    print(f"exported {report['source']}\n  as {args.to} to {report['out']}: {len(report['files'])} weight file(s), "
          f"{report['bytes'] / mib:.1f} MiB in {report['seconds']} s; {memory}", flush=True)
    return 0
