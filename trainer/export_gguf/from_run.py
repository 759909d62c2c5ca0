"""`trainer export SOURCE --to gguf|gguf-model --out FILE`: GGUF from anything `trainer export` reads.

The source (a run dir, its final/, or a checkpoint of any strategy and world size) is first exported by
trainer/export into a scratch dir, as an adapter (--to gguf) or as a merged / full Hugging Face model
(--to gguf-model), and that dir is then written as GGUF. One reader of checkpoints, one writer of GGUF.
"""

from __future__ import annotations

import os
import tempfile
import time

from trainer.errors import UserError

TARGETS = ("gguf", "gguf-model")


def export_gguf(source: str, to: str, out_path: str, gguf_dtype: str | None = None, log=print) -> dict:
    """Write `out_path` (a .gguf file); returns a report like trainer.export.export's."""
    from trainer.export import export
    from trainer.export.source import open_source
    from trainer.export_gguf import write_lora_adapter, write_model

    if to not in TARGETS:
        raise UserError(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    out_path = os.path.abspath(out_path)
    if os.path.isdir(out_path):
        raise UserError(f"--out {out_path} is a directory: GGUF is one file, e.g. --out model.gguf")
    started = time.perf_counter()
    opened = open_source(source, log=log)
    with tempfile.TemporaryDirectory(prefix="gguf-", dir=os.path.dirname(out_path) or ".") as scratch:
        staged = os.path.join(scratch, "hf")
        if to == "gguf":
            if opened.config.peft.name not in ("lora", "qlora"):
                raise UserError(f"--to gguf writes a LoRA adapter; this run trained {opened.config.peft.name}: use "
                                "--to gguf-model for a merged model")
            export(source, "adapter", staged, log=log)
            write_lora_adapter(staged, out_path, base_dir=opened.config.model.path, dtype=gguf_dtype or "f32")
        else:
            export(source, "merged" if opened.peft else "hf", staged, dtype="fp32", log=log)
            write_model(staged, out_path, dtype=gguf_dtype or "f16")
    return {"source": opened.description, "out": out_path, "files": [os.path.basename(out_path)],
            "bytes": os.path.getsize(out_path), "seconds": round(time.perf_counter() - started, 2)}
