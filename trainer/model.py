"""Load a Hugging Face causal LM and its tokenizer from a local dir (or a hub id where one is reachable).

No distributed code lives here: strategies shard, wrap and checkpoint what this returns. Weights load
through safetensors (or `weights_only` pickles); code shipped with a checkpoint runs only when
`model.trust_remote_code=true`.
"""

from __future__ import annotations

import logging
import os

from trainer.config.schema import ModelConfig
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError("model.tokenizer" if cfg.tokenizer else "model.path",
                          f"cannot load a tokenizer from {source!r}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is always present.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_config(cfg: ModelConfig):
    from transformers import AutoConfig

    if cfg.path is not None:
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    arch = dict(cfg.arch or {})
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.arch.model_type", "is required to build a model from model.arch")
    return AutoConfig.for_model(model_type, **arch)


def load_model(cfg: ModelConfig, dtype):
    """The model in `dtype`, on CPU; random weights when `model.init=random` (pre-training from scratch)."""
    from transformers import AutoModelForCausalLM

    common = {"attn_implementation": cfg.attn_implementation, "trust_remote_code": cfg.trust_remote_code}
    if cfg.init == "random":
        model = AutoModelForCausalLM.from_config(load_model_config(cfg), dtype=dtype, **common)
    else:
        if cfg.path and os.path.isdir(cfg.path) and not _has_weights(cfg.path):
            raise ConfigError("model.path", f"{cfg.path!r} holds no weights (*.safetensors or *.bin); "
                              "use model.init=random to start from fresh weights")
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **common)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def _has_weights(path: str) -> bool:
    return any(name.endswith((".safetensors", ".bin")) for name in os.listdir(path))
