"""Next-token cross-entropy over label tokens without ever holding the full logits.

The unchunked loss (`token_loss_sum`) projects every position onto the vocabulary at once: with a 128k-256k
vocabulary the b x s x V logits, their fp32 upcast, the log-softmax kept for backward and its gradients are the
largest tensors of a fine-tuning step (12-14 bytes per logit: 6-7 GiB for 4096 tokens of Llama-3.1).
`chunked_cross_entropy_sum` runs lm_head and the loss over `chunk_tokens` positions at a time, each chunk under
non-reentrant activation checkpointing: the forward keeps only the chunk's scalar loss, and backward recomputes
one chunk's logits at a time. The terms and their sum are the unchunked loss's (up to the order of fp32 additions).

Only positions that predict a label token reach lm_head (`labelled_positions`): prompts, padding and the last
position of each sample add nothing to the loss, so projecting them onto the vocabulary is wasted work -- most of
lm_head's share of a step in instruction tuning, where prompts are masked out. When what is left fits one chunk,
its logits are not recomputed in backward: the forward's copy lives only until the start of backward, when the last
layer's activations are alive anyway, which is also when a recomputed chunk would exist.

lm_head is called as the module the model calls, never through its weight, so whatever wraps it keeps working:
PEFT adapters or modules_to_save on lm_head, tied embeddings, DeepSpeed ZeRO-3's parameter-gathering hooks.
"""

from __future__ import annotations

from trainer.data.encode import IGNORE_INDEX


def token_loss_sum(logits, labels):
    """Sum of next-token cross-entropy over label tokens, in fp32 (logits may be bf16/fp16): the unchunked loss."""
    import torch.nn.functional as F

    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def next_token_labels(labels):
    """labels[:, t] -> the label position t predicts (labels[:, t + 1]); the last position predicts nothing.

    Shifting the labels rather than slicing the hidden states keeps the hidden states contiguous (no copy), and the
    ignored last position adds nothing to the sum: the same terms as `token_loss_sum`."""
    import torch

    ignored = labels.new_full((labels.size(0), 1), IGNORE_INDEX)
    return torch.cat([labels[:, 1:], ignored], dim=1)


def labelled_positions(hidden, labels):
    """(the hidden states of the positions that predict a label token, those labels), flattened: (n, h), (n,).

    Exact: the other positions' terms are zero. Never empty of graph: with no label token it is (0, h), on which
    lm_head still runs, so every parameter takes part in backward as data-parallel wrappers expect."""
    flat_labels = next_token_labels(labels).reshape(-1)
    keep = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    return hidden.reshape(-1, hidden.size(-1)).index_select(0, keep), flat_labels.index_select(0, keep)


def _chunk_loss_sum(hidden, labels, lm_head, softcap):
    import torch
    import torch.nn.functional as F

    logits = lm_head(hidden)
    if softcap is not None:  # Gemma 2's final logit soft-capping, in the logits' dtype as transformers applies it
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_cross_entropy_sum(hidden, labels, lm_head, chunk_tokens: int, softcap: float | None = None):
    """Sum of next-token cross-entropy, fp32, from the final hidden states (b, s, h) and unshifted labels (b, s).

    At most one chunk's logits are alive at a time, in the forward and in backward (where each chunk is recomputed).
    Under no_grad (evaluation) nothing is kept, so chunks run without checkpointing."""
    import torch
    from torch.utils.checkpoint import checkpoint

    flat_hidden, flat_labels = labelled_positions(hidden, labels)
    # One split node: backward concatenates the chunks' hidden-state gradients once (n*h values, not n*V).
    pieces = list(zip(flat_hidden.split(chunk_tokens), flat_labels.split(chunk_tokens)))
    total = None
    for hidden_chunk, label_chunk in pieces:
        if torch.is_grad_enabled() and len(pieces) > 1:
            # preserve_rng_state (the default) replays dropout identically if lm_head carries a LoRA adapter.
            part = checkpoint(_chunk_loss_sum, hidden_chunk, label_chunk, lm_head, softcap, use_reentrant=False)
        else:
            part = _chunk_loss_sum(hidden_chunk, label_chunk, lm_head, softcap)
        total = part if total is None else total + part
    return total
