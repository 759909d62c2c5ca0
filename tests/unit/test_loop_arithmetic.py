"""The training loop's arithmetic: token-normalised loss over the whole global batch, derived accumulation."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import compose_config


def _recipe(tmp_path, micro: int, global_batch: int, *extra: str):
    from trainer.recipe import Recipe

    config = compose_config(f"run.dir={tmp_path}", f"train.micro_batch_size={micro}",
                            f"train.global_batch_size={global_batch}", "logger.progress=false",
                            "optim.max_grad_norm=0", "data.shuffle=false", "seed=7", *extra)
    return Recipe(config)


def _first_step_gradients(recipe) -> tuple[dict, float]:
    """Run one real train_step and capture the gradients the strategy is about to apply."""
    captured = {}
    original_step = recipe.strategy.step

    def capture_then_step(model, optimizer, max_grad_norm):
        for name, param in model.named_parameters():
            if param.grad is not None:
                captured[name] = param.grad.detach().clone()
        return original_step(model, optimizer, max_grad_norm)

    recipe.strategy.step = capture_then_step
    metrics = recipe.train_step()
    return captured, metrics["loss"]


@pytest.mark.parametrize("peft", [["peft=none"], ["peft=lora", "peft.dropout=0"]])  # dropout draws differ per split
def test_global_batch_split_1x4_or_4x1_gives_the_same_gradient(tmp_path, peft):
    one_by_four = _recipe(tmp_path / "a", 1, 4, *peft)  # four micro batches of one row
    four_by_one = _recipe(tmp_path / "b", 4, 4, *peft)  # one micro batch of four (padded) rows
    assert (one_by_four.accumulation_steps, four_by_one.accumulation_steps) == (4, 1)
    grads_a, loss_a = _first_step_gradients(one_by_four)
    grads_b, loss_b = _first_step_gradients(four_by_one)
    assert grads_a.keys() == grads_b.keys() and grads_a
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for name in grads_a:
        # fp32 sums in another order differ by rounding: tolerate 1e-6 of the tensor's own scale, no more.
        scale = float(grads_b[name].abs().max())
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-4, atol=1e-6 * scale, msg=name)


def test_loss_is_the_mean_over_label_tokens_of_the_global_batch(tmp_path):
    """Rows of different lengths: the step loss weights every label token equally, not every row."""
    from trainer.data.loader import collate
    from trainer.evaluate import token_loss_sum

    recipe = _recipe(tmp_path, 2, 4, "peft=none", "data.packing=false")
    indices = recipe.sampler._epoch_order(0)[:4].tolist()
    rows = [recipe.data.train[i] for i in indices]
    assert len({row.num_label_tokens for row in rows}) > 1, "the check needs rows with different label counts"
    with torch.no_grad():
        total = 0.0
        for row in rows:
            batch = collate([row], recipe.tokenizer.pad_token_id)
            total += float(token_loss_sum(recipe.model(input_ids=batch.inputs["input_ids"]).logits, batch.labels))
    expected = total / sum(row.num_label_tokens for row in rows)
    _, loss = _first_step_gradients(recipe)
    assert loss == pytest.approx(expected, rel=1e-5)


def test_accumulation_is_derived_and_a_mismatch_is_a_config_error(tmp_path):
    from trainer.errors import ConfigError

    assert _recipe(tmp_path, 2, 8).accumulation_steps == 4
    with pytest.raises(ConfigError, match="train.global_batch_size"):
        compose_config(f"run.dir={tmp_path}", "train.micro_batch_size=3", "train.global_batch_size=8")


def test_schedule_warms_up_then_decays():
    from trainer.config.schema import OptimConfig
    from trainer.optim import lr_multiplier

    cfg = OptimConfig(warmup_ratio=0.1, scheduler="cosine", min_lr_ratio=0.1)
    values = [lr_multiplier(step, 100, cfg) for step in range(100)]
    assert values[0] < values[5] < values[9] <= 1.0
    assert values[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[10:], values[11:]))
    assert values[-1] == pytest.approx(0.1, abs=0.01)
    assert lr_multiplier(50, 100, OptimConfig(scheduler="constant", warmup_ratio=0.0)) == 1.0
    linear = OptimConfig(scheduler="linear", warmup_ratio=0.0)
    assert lr_multiplier(50, 100, linear) == pytest.approx(0.5)


def test_warmup_steps_wins_over_warmup_ratio():
    from trainer.config.schema import OptimConfig
    from trainer.optim import lr_multiplier

    cfg = OptimConfig(warmup_steps=4, warmup_ratio=0.5, scheduler="constant")
    assert [lr_multiplier(step, 100, cfg) for step in range(6)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0])


def test_max_steps_per_epoch_cuts_each_epoch_short_with_a_new_shuffle_and_resumes_in_place():
    from trainer.data.loader import GlobalBatchSampler

    capped = GlobalBatchSampler(100, 10, seed=1, max_steps_per_epoch=3)
    assert capped.steps_per_epoch == 3 and GlobalBatchSampler(100, 10, seed=1).steps_per_epoch == 10
    batches = [capped.next_global_batch() for _ in range(7)]
    assert [capped.state.epoch, capped.state.position] == [2, 10]
    full = GlobalBatchSampler(100, 10, seed=1)
    first_epoch = [full.next_global_batch() for _ in range(3)]
    assert batches[:3] == first_epoch  # the cap cuts the epoch's order short, it does not change it
    second = GlobalBatchSampler(100, 10, seed=1)
    second.state.epoch = 1
    assert batches[3] == second.next_global_batch()  # step 4 starts epoch 1's shuffle
    resumed = GlobalBatchSampler(100, 10, seed=1, max_steps_per_epoch=3)
    resumed.load_state_dict({**capped.state_dict()})
    reference = GlobalBatchSampler(100, 10, seed=1, max_steps_per_epoch=3)
    for _ in range(7):
        reference.next_global_batch()
    assert resumed.next_global_batch() == reference.next_global_batch()


def test_no_weight_decay_on_norms_and_biases(tmp_path):
    from trainer.optim import param_groups

    recipe = _recipe(tmp_path, 4, 4, "peft=none", "optim.weight_decay=0.1")
    groups = param_groups(recipe.model, 0.1)
    names = {id(p): n for n, p in recipe.model.named_parameters()}
    decayed = {names[id(p)] for p in groups[0]["params"]}
    undecayed = {names[id(p)] for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert all("norm" in n for n in undecayed) and not any("norm" in n for n in decayed)
