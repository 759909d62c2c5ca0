"""Activation offloading (trainer/activation_offload.py): with per-layer checkpointing, each checkpointed layer's
input is parked in host memory between forward and backward -- exactly one residual-stream tensor per layer, as
`trainer plan` counts it -- and training is unchanged: the same loss and gradients, under Hugging Face's
checkpointing (single, ddp, DeepSpeed) and torch's checkpoint_wrapper (fsdp). On this CPU machine the copy is host
to host; tests/gpu/test_cuda.py measures what it saves on a GPU."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from tests.conftest import assert_one_line_error, run_cli  # noqa: E402
from tests.unit.test_chunked_loss import loss_and_grads, packed_batch, tiny_model  # noqa: E402
from trainer.objectives.chunked_ce import token_loss_sum  # noqa: E402


def lora_with_nonzero_adapters(base):
    """BASE with LoRA r=4 on every linear, its B matrices drawn (not zero), so that every gradient path carries
    something; in training mode."""
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    return model.train()


def _lora_model(checkpointing: str, offload: bool):
    from trainer.strategy.fsdp import apply_layer_checkpointing
    from trainer.strategy.precision import apply_activation_checkpointing

    model = lora_with_nonzero_adapters(tiny_model("llama-3.1", num_hidden_layers=3))
    if checkpointing == "hf":
        apply_activation_checkpointing(model, offload=offload)
    else:
        apply_layer_checkpointing(model)
        if offload:
            from trainer.activation_offload import offload_checkpointed_inputs

            offload_checkpointed_inputs(model)
    return model


@pytest.mark.parametrize("checkpointing", ["hf", "checkpoint_wrapper"])
def test_offloading_moves_one_layer_input_per_layer_and_changes_no_gradient(checkpointing):
    from trainer.plan import count_parameters
    from trainer.plan.activations import ActivationSetting, layer_input_bytes, model_activation_bytes
    from trainer.plan.trainable import count_trainable

    inputs, labels = packed_batch(1000, batch=2, seq_len=24)
    plain = _lora_model(checkpointing, offload=False)
    expected, expected_grads = loss_and_grads(plain, lambda: token_loss_sum(plain(**inputs).logits, labels))
    model = _lora_model(checkpointing, offload=True)
    offload = model.activation_offload
    loss, grads = loss_and_grads(model, lambda: token_loss_sum(model(**inputs).logits, labels))
    assert loss.item() == expected.item()
    assert grads.keys() == expected_grads.keys() and len(grads) == 3 * 7 * 2
    for name, grad in grads.items():
        assert torch.equal(grad, expected_grads[name]), name

    # What moved is what the planner takes off the GPU: every layer's input (fp32 here), and nothing else.
    config = model.get_base_model().config
    params = count_parameters(config.to_dict())
    trainable = count_trainable(params, "lora", r=4)
    setting = ActivationSetting(4, "eager")
    per_layer = layer_input_bytes(params, trainable, 24, 2, setting)
    assert per_layer == 2 * 24 * config.hidden_size * 4
    assert offload.bytes_moved == config.num_hidden_layers * per_layer
    kept = {flag: model_activation_bytes(params, trainable, 24, 2, setting, True, offload=flag)
            for flag in (False, True)}
    assert kept[False] - kept[True] == (config.num_hidden_layers - 1) * per_layer


def test_offloading_without_checkpointing_is_a_one_line_error(tmp_path):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", "train.activation_offloading=true",
                     "train.gradient_checkpointing=false", timeout=120)
    assert_one_line_error(result, "train.activation_offloading", "gradient_checkpointing=true")
    assert not (tmp_path / "run").exists()


def test_a_model_without_checkpointed_layers_is_a_config_error_naming_the_key():
    from trainer.activation_offload import offload_checkpointed_inputs
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="train.activation_offloading"):
        offload_checkpointed_inputs(tiny_model("llama-3.1", num_hidden_layers=1))  # checkpointing never enabled
