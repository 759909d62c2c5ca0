"""trainer: fine-tune large language models from one CPU process to many GPUs and nodes.

Importing this package is cheap on purpose: torch, transformers, peft and deepspeed are imported
lazily by the modules that need them, so `trainer --help` and config errors answer in about a second.
"""

__version__ = "0.1.0"
