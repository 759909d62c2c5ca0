"""CPU serving through llama.cpp: the base as one GGUF file, each adapter as a GGUF LoRA adapter, and a config
file for llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server --config_file`).

That server holds one model at a time: each adapter is an entry of its config (the same base file plus the adapter's
lora_path) under the adapter's name, which a request picks with its `model` field; switching entries reloads the
base (memory-mapped, so milliseconds for small models, seconds for 7B). The GGUF files are kept in the work dir
under a key of what they were made from, so the next start with the same sources writes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys

ENGINE = "llama.cpp (llama-cpp-python server)"


def _source_key(directory: str, *extra: str) -> str:
    """A key of a dir's files (name, size, modification time) and the options a GGUF is written with."""
    digest = hashlib.sha256("\0".join(extra).encode())
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            stat = os.stat(path)
            digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\0".encode())
    return digest.hexdigest()[:16]


def _write_once(path: str, write, log) -> str:
    if os.path.isfile(path):
        log(f"serve: reusing {path}")
        return path
    log(f"serve: writing {path}")
    write(path)
    return path


def prepare(served, work_dir: str, host: str, port: int, gguf_dtype: str = "f16", context: int | None = None,
            threads: int | None = None, log=print) -> tuple[list[str], str]:
    """(command, config path): the GGUF files and the server's config, written under work_dir."""
    from trainer.export_gguf import write_lora_adapter, write_model

    os.makedirs(work_dir, exist_ok=True)
    base_key = _source_key(served.base_dir, gguf_dtype, served.chat_template or "")
    base_gguf = _write_once(os.path.join(work_dir, f"{served.base_name}-{gguf_dtype}-{base_key}.gguf"),
                            lambda out: write_model(served.base_dir, out, gguf_dtype, served.chat_template), log)
    common = {"n_ctx": context or _context_length(served.base_dir), "n_threads": threads or _threads(),
              "chat_format": "chat_template.default", "verbose": False}
    models = [{"model": base_gguf, "model_alias": served.base_name, **common}]
    for adapter in served.adapters:
        key = _source_key(adapter.path, "f32", served.base_dir)
        adapter_gguf = _write_once(
            os.path.join(work_dir, f"{adapter.name}-lora-{key}.gguf"),
            lambda out, a=adapter: write_lora_adapter(a.path, out, base_dir=served.base_dir, dtype="f32"), log)
        models.append({"model": base_gguf, "model_alias": adapter.name, "lora_path": adapter_gguf, **common})
    config_path = os.path.join(work_dir, f"llama-cpp-server-{port}.json")
    tmp = f"{config_path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"host": host, "port": port, "models": models}, fh, indent=2)
    os.replace(tmp, config_path)
    return [sys.executable, "-m", "llama_cpp.server", "--config_file", config_path], config_path


def _context_length(base_dir: str) -> int:
    """The model's context, at most 4096 tokens (the KV cache of a longer one is memory a CPU server rarely has)."""
    from trainer.jsonfile import read_json

    config = read_json(os.path.join(base_dir, "config.json"))
    return min(int(config.get("max_position_embeddings") or 2048), 4096)


def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def check_installed() -> None:
    from importlib.util import find_spec

    from trainer.errors import UserError

    missing = [name for name in ("llama_cpp", "uvicorn", "fastapi", "sse_starlette", "starlette_context",
                                 "pydantic_settings") if find_spec(name) is None]
    if missing:
        raise UserError(f"serve: the CPU engine needs llama-cpp-python's server ({', '.join(missing)} missing): "
                        "pip install 'trainer[serve]' (`make install-test` builds llama-cpp-python's wheel once)")
