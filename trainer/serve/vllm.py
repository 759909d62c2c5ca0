"""GPU serving through vLLM's OpenAI-compatible server with LoRA enabled: the base model dir as is, each adapter
(a PEFT dir, as our runs write them) under its name with --lora-modules; vLLM batches requests for several adapters
together on one copy of the base.
"""

from __future__ import annotations

import os
import sys

ENGINE = "vLLM"
# vLLM sizes its LoRA buffers for --max-lora-rank, which must be one of these.
_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def max_lora_rank(ranks: list[int]) -> int:
    needed = max(ranks or [8])
    for rank in _LORA_RANKS:
        if rank >= needed:
            return rank
    from trainer.errors import UserError

    raise UserError(f"serve: an adapter of rank {needed} is above vLLM's largest --max-lora-rank {_LORA_RANKS[-1]}")


def prepare(served, work_dir: str, host: str, port: int, context: int | None = None, log=print) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", served.base_dir,
               "--served-model-name", served.base_name, "--host", host, "--port", str(port), "--dtype", "auto"]
    if context:
        command += ["--max-model-len", str(context)]
    if served.adapters:
        command += ["--enable-lora", "--max-loras", str(len(served.adapters)),
                    "--max-lora-rank", str(max_lora_rank([a.rank for a in served.adapters])), "--lora-modules",
                    *(f"{a.name}={a.path}" for a in served.adapters)]
    if served.chat_template:  # the adapters were trained with another layout than the tokenizer's own
        os.makedirs(work_dir, exist_ok=True)
        path = os.path.join(work_dir, f"chat_template-{served.template_name}.jinja")
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(served.chat_template)
        command += ["--chat-template", path]
    return command


def check_installed() -> None:
    from importlib.util import find_spec

    from trainer.errors import UserError

    if find_spec("vllm") is None:
        raise UserError("serve: --engine vllm needs vLLM on a CUDA machine: pip install 'trainer[serve-gpu]'")
