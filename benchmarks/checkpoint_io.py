"""Checkpoint save time and size against the disk's own write speed (`dd`), side by side in one run: the embedded
model and a ~100M-parameter Llama (random weights, full fine-tuning: weights + AdamW state), each saved
synchronously and with checkpoint.async_save (where training waits only for the copy to host memory).

    python benchmarks/checkpoint_io.py [--dir /path/on/the/disk/to/measure]"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import tempfile
import time
from pathlib import Path

from common import first_float, table, train

# ~106M parameters: 12 layers of hidden 768 (GQA 12/4) plus untied 32k embeddings.
MODEL_100M = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 768,
              "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 4,
              "vocab_size": 32000, "max_position_embeddings": 512, "tie_word_embeddings": False,
              "rms_norm_eps": 1e-5, "torch_dtype": "float32"}


def dd_write_mib_per_s(directory: Path, mib: int = 1024) -> float:
    """Sequential write speed with the data on disk at the end (conv=fsync), as a checkpoint must be."""
    target = directory / "dd.bin"
    started = time.perf_counter()
    subprocess.run(["dd", "if=/dev/zero", f"of={target}", "bs=1M", f"count={mib}", "conv=fsync"], check=True,
                   capture_output=True)
    elapsed = time.perf_counter() - started
    target.unlink()
    return mib / elapsed


def save_once(run_dir: Path, model: list[str], async_save: bool) -> tuple[float, float, float | None]:
    """(MiB, seconds to commit, seconds training was paused) of the step-2 checkpoint of a 2-step run."""
    _, log = train(run_dir, *model, "peft=none", "train.max_steps=2", "train.micro_batch_size=1",
                   "train.global_batch_size=1", "data.max_seq_len=64", "checkpoint.every_n_steps=2",
                   f"checkpoint.async_save={str(async_save).lower()}", "train.precision=fp32")
    match = re.search(r"checkpoint step-000002 committed: ([\d.]+) MiB in ([\d.]+) s", log)
    if not match:
        raise SystemExit(f"no commit line in the run's log:\n{log[-2000:]}")
    return float(match.group(1)), float(match.group(2)), first_float(r"training paused ([\d.]+) s", log)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dir", default=None, help="where runs and dd write (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        speed = dd_write_mib_per_s(root)
        model_dir = root / "model-100m"
        model_dir.mkdir()
        (model_dir / "config.json").write_text(json.dumps(MODEL_100M))
        models = {"tiny-llama (3.4M)": [],
                  "llama ~106M": [f"model.path={model_dir}", "model.init=random",
                                  "model.tokenizer=${asset:tiny-llama}"]}
        rows = []
        for name, model in models.items():
            for async_save in (False, True):
                run = root / f"run-{len(rows)}"
                mib, seconds, paused = save_once(run, model, async_save)
                rows.append([name, "async" if async_save else "sync", mib, seconds, mib / seconds,
                             paused if paused is not None else seconds])
    print(f"disk: dd write with fsync {speed:,.0f} MiB/s")
    print(table(["model", "save", "MiB", "commit s", "MiB/s", "training paused s"], rows))


if __name__ == "__main__":
    main()
