"""train.embedding_on_host (trainer/host_embedding.py): a LoRA model's frozen input embedding stays in host memory
and is looked up there. Training is unchanged (same loss, same adapter gradients, checkpointed layers included), a
device move leaves the embedding where it is, and the model's state dict still carries it. What it cannot serve
(a tied lm_head, a trained embedding, a sharded strategy) is refused with the key to change."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tests.conftest import assert_one_line_error, run_cli  # noqa: E402
from tests.unit.test_activation_offload import lora_with_nonzero_adapters  # noqa: E402
from tests.unit.test_chunked_loss import loss_and_grads, packed_batch, tiny_model  # noqa: E402
from trainer.objectives.chunked_ce import token_loss_sum  # noqa: E402

EMBEDDING_KEY = "base_model.model.model.embed_tokens.weight"


def _lora_model(on_host: bool, family: str = "llama-3.1"):
    from trainer.host_embedding import keep_input_embedding_on_host
    from trainer.strategy.precision import apply_activation_checkpointing

    model = lora_with_nonzero_adapters(tiny_model(family, num_hidden_layers=2))
    if on_host:
        keep_input_embedding_on_host(model)
    apply_activation_checkpointing(model)  # as the strategies do, after the model is built
    return model


def test_the_embedding_leaves_the_module_tree_and_training_is_unchanged():
    inputs, labels = packed_batch(1000)
    plain = _lora_model(on_host=False)
    expected, expected_grads = loss_and_grads(plain, lambda: token_loss_sum(plain(**inputs).logits, labels))
    model = _lora_model(on_host=True)
    loss, grads = loss_and_grads(model, lambda: token_loss_sum(model(**inputs).logits, labels))
    assert loss.item() == expected.item()
    assert grads.keys() == expected_grads.keys() and len(grads) == 2 * 7 * 2  # every adapter of both layers
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name

    # Checkpointing's input-gradient hook sits on the host embedding, which replaced the module it would have hooked.
    assert model.get_input_embeddings()._forward_hooks
    # Not a parameter any more (no strategy moves, broadcasts or optimises it), still in the state dict.
    assert not any("embed_tokens" in name for name, _ in model.named_parameters())
    state = model.state_dict()
    assert torch.equal(state[EMBEDDING_KEY], plain.state_dict()[EMBEDDING_KEY])
    from trainer.adapters import parameter_report

    assert parameter_report(model).total == parameter_report(plain).total

    # A device move takes every parameter but leaves the embedding in host memory.
    model.to("meta")
    assert next(p for p in model.parameters()).device.type == "meta"
    assert model.get_input_embeddings().weight.device.type == "cpu"


def test_loading_a_state_dict_writes_into_the_host_embedding():
    model = _lora_model(on_host=True)
    state = model.state_dict()
    state[EMBEDDING_KEY] = torch.full_like(state[EMBEDDING_KEY], 0.5)
    model.load_state_dict(state)
    assert torch.all(model.get_input_embeddings().weight == 0.5)


def test_a_tied_or_trained_embedding_is_refused_naming_the_key():
    from trainer.errors import ConfigError
    from trainer.host_embedding import keep_input_embedding_on_host

    with pytest.raises(ConfigError, match="train.embedding_on_host.*tie_word_embeddings"):
        _lora_model(on_host=True, family="llama-3.2")
    trained = tiny_model("llama-3.1", num_hidden_layers=1)  # full fine-tuning: every weight trains
    with pytest.raises(ConfigError, match="train.embedding_on_host.*trains"):
        keep_input_embedding_on_host(trained)


@pytest.mark.parametrize(("overrides", "why"), [
    (("peft=none",), "trains the embedding"),
    (("strategy=fsdp",), "shards the embedding"),
    (("peft.modules_to_save=[embed_tokens]",), "modules_to_save trains the input embedding"),
])
def test_what_it_cannot_serve_is_a_one_line_error_before_launch(tmp_path, overrides, why):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "train.embedding_on_host=true", *overrides, timeout=120)
    assert_one_line_error(result, "train.embedding_on_host", why)
    assert not (tmp_path / "run").exists()
