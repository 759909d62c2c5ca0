"""Mixtral's router load-balancing loss: the same as transformers' own on a padded batch, taken over real tokens
only on packed rows (whose 4-D mask transformers' loss cannot read), and logged apart from the LM loss."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def mixtral():
    import torch
    from transformers import AutoModelForCausalLM, MixtralConfig

    from trainer.replicas import shrink

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(MixtralConfig(**{**shrink("mixtral"), "vocab_size": 512}))


def test_router_loss_equals_transformers_own_on_a_padded_batch(mixtral):
    import torch

    from trainer.moe import build_router_loss

    ids = torch.randint(0, 512, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 7:] = 0  # the second row is padded
    router_loss = build_router_loss(mixtral)
    assert router_loss is not None and router_loss.coef == 0.02 and len(router_loss.routers) == 2
    mixtral.train()
    theirs = mixtral(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True).aux_loss
    router_loss.pop()  # the logits of that call
    mixtral(input_ids=ids, attention_mask=mask)
    ours = router_loss.pop(mask)
    assert float(ours) == pytest.approx(0.02 * float(theirs), rel=1e-6)
    assert ours.requires_grad  # it trains the model, not only the log
    mixtral.eval()
    mixtral(input_ids=ids, attention_mask=mask)
    assert router_loss.pop(mask) == 0.0  # evaluation leaves nothing behind
    router_loss.remove()


def test_packed_rows_mark_their_real_tokens_for_the_router_loss():
    import numpy as np

    from trainer.data.encode import EncodedSample
    from trainer.data.loader import collate
    from trainer.data.packing import PackedRow

    def sample(n):
        ids = np.arange(1, n + 1)
        return EncodedSample(ids, ids)

    rows = [PackedRow((sample(3), sample(4))), PackedRow((sample(2),))]
    batch = collate(rows, pad_id=0)
    assert batch.token_mask.tolist() == [[1] * 7, [1, 1, 0, 0, 0, 0, 0]]
    assert int(batch.token_mask.sum()) == batch.num_tokens


def test_dense_models_have_no_router_loss():
    from transformers import AutoModelForCausalLM, LlamaConfig

    from trainer.moe import build_router_loss

    dense = AutoModelForCausalLM.from_config(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                         num_attention_heads=4, vocab_size=64))
    assert build_router_loss(dense) is None
