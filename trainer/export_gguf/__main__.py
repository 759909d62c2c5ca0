"""`python -m trainer.export_gguf adapter|model SOURCE OUT`: GGUF files for llama.cpp from a shell.

  adapter SOURCE OUT [--base DIR] [--dtype f32|f16]
      a LoRA (or QLoRA) adapter dir, or a run dir whose final/ is one, as a GGUF LoRA adapter
  model SOURCE OUT [--dtype f16|q8_0|f32]
      a Hugging Face model dir, or an adapter dir / run dir (merged into its base first), as a GGUF model
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from trainer.errors import EXIT_USER_ERROR, UserError


def resolve_source(source: str) -> str:
    """A run dir means its final/ (the trained model or adapter)."""
    final = os.path.join(source, "final")
    return final if os.path.isdir(final) and not os.path.isfile(os.path.join(source, "config.json")) else source


def write_model_from(source: str, out_path: str, dtype: str = "f16") -> str:
    """GGUF model from a model dir, or from an additive adapter merged into its base (in a temporary dir)."""
    from trainer.export_gguf import write_model

    source = resolve_source(source)
    if not os.path.isfile(os.path.join(source, "adapter_config.json")):
        return write_model(source, out_path, dtype=dtype)
    from trainer.adapters import merge_adapter

    with tempfile.TemporaryDirectory(prefix="merged-") as merged:
        merge_adapter(source, merged, dtype="fp32")
        return write_model(merged, out_path, dtype=dtype)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trainer.export_gguf", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["adapter", "model"])
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--base", help="base model dir (adapter; default: the adapter's base_model_name_or_path)")
    parser.add_argument("--dtype", help="adapter: f32 (default) | f16; model: f16 (default) | q8_0 | f32")
    args = parser.parse_args(argv)
    try:
        if args.what == "adapter":
            from trainer.export_gguf import write_lora_adapter

            path = write_lora_adapter(resolve_source(args.source), args.out, base_dir=args.base,
                                      dtype=args.dtype or "f32")
        else:
            path = write_model_from(args.source, args.out, dtype=args.dtype or "f16")
    except UserError as err:
        sys.stderr.write(f"trainer: {err}\n")
        return EXIT_USER_ERROR
    print(f"wrote {path} ({os.path.getsize(path) / 1024**2:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
