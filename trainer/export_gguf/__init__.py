"""GGUF export for llama.cpp: a LoRA adapter (`write_lora_adapter`) and a whole Llama-family model
(`write_model`, f32/f16/q8_0). Both read Hugging Face / PEFT dirs and write through the `gguf` package
(`pip install 'trainer[export]'`); `python -m trainer.export_gguf --help` runs them from a shell.

What llama.cpp expects, and why each piece is the way it is, is documented where it is done:
layout.py (tensor names, hyper-parameters, the rotary row order of q/k), adapter.py, model.py.
"""

from __future__ import annotations


def write_lora_adapter(adapter_dir: str, out_path: str, base_dir: str | None = None, dtype: str = "f32") -> str:
    from trainer.export_gguf.adapter import write_lora_adapter as write

    return write(adapter_dir, out_path, base_dir=base_dir, dtype=dtype)


def write_model(model_dir: str, out_path: str, dtype: str = "f16", chat_template: str | None = None) -> str:
    from trainer.export_gguf.model import write_model as write

    return write(model_dir, out_path, dtype=dtype, chat_template=chat_template)


__all__ = ["write_lora_adapter", "write_model"]
