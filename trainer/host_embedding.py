"""train.embedding_on_host: a frozen input embedding kept in host memory, looked up there.

The input embedding is the one large weight a step reads only by row: a micro batch of 2 x 2048 tokens needs 4,096
of Llama-3.1-8B's 128,256 rows (32 MiB of 1 GiB). Under LoRA-family methods it never trains, so it can stay in host
memory: the token ids go to the host, the lookup runs there, the rows come back to the GPU. The cost is two small
transfers per forward; the gain is the whole embedding off the GPU, per rank.

The embedding module is held out of the module tree, so `model.to(device)`, DDP's and DeepSpeed's parameter
broadcasts and the optimizer never see it. The model's state dict still has its weight under the usual key (an export
or a merged save reads it from there), and loading a state dict writes into it. Which methods, models and strategies
can use it: trainer/config/feasibility.py (host_embedding_refusal).
"""

from __future__ import annotations

import torch

HOST = torch.device("cpu")


class HostEmbedding(torch.nn.Module):
    """Wraps a model's input embedding module on the host; its own forward does the lookup (a family that scales
    its embeddings keeps doing so)."""

    def __init__(self, embedding: torch.nn.Module):
        super().__init__()
        self._held = (embedding.to(HOST),)  # a tuple, not an attribute Module: out of .to(), parameters(), hooks

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "_held":
                raise
            return getattr(self._held[0], name)  # num_embeddings, embedding_dim, padding_idx, ... as before

    @property
    def embedding(self) -> torch.nn.Module:
        return self._held[0]

    @property
    def weight(self) -> torch.Tensor:
        return self.embedding.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        rows = self.embedding(input_ids.to(HOST))
        return rows.to(input_ids.device)  # from pageable memory: a synchronous copy, which the next op needs anyway

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        for name, tensor in self.embedding.state_dict(keep_vars=keep_vars).items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        for name, tensor in self.embedding.state_dict().items():
            key = prefix + name
            if key in state_dict:
                with torch.no_grad():
                    tensor.copy_(state_dict[key])
            elif strict:
                missing_keys.append(key)

    def extra_repr(self) -> str:
        return f"{self.embedding!r} on the host"


def keep_input_embedding_on_host(model) -> int:
    """Replace MODEL's input embedding (a PEFT model's base included) by a HostEmbedding; returns its bytes.

    Call before activation checkpointing, whose input-gradient hook is registered on the input embedding module."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embedding = base.get_input_embeddings()
    if isinstance(embedding, HostEmbedding):
        return 0
    # validate refuses both from the config; these guard a checkpoint or a wrapper that does it anyway
    from trainer.errors import ConfigError

    output = base.get_output_embeddings()
    if output is not None and output.weight is embedding.weight:
        raise ConfigError("train.embedding_on_host", "this model's lm_head is its input embedding "
                          "(tie_word_embeddings), which the loss needs on the GPU: set train.embedding_on_host=false")
    if any(p.requires_grad for p in embedding.parameters()):
        raise ConfigError("train.embedding_on_host", "the input embedding trains in this run; only a frozen one can "
                          "stay in host memory: set train.embedding_on_host=false")
    size = sum(t.numel() * t.element_size() for t in embedding.state_dict().values())
    was_on_gpu = embedding.weight.is_cuda
    base.set_input_embeddings(HostEmbedding(embedding))
    if was_on_gpu:  # QLoRA loads straight onto the GPU: give the cached block back
        torch.cuda.empty_cache()
    return size
