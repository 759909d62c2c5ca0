"""Packing: best-fit placement, efficiency, no cross-talk (packed == unpacked, loss and gradients), the sampler."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import FIXTURES, REPO

DATA = FIXTURES / "data"
TINY_LLAMA = REPO / "trainer" / "assets" / "tiny-llama"
SHARED_ALPACA = REPO.parent / "shared" / "data" / "samples" / "alpaca_100.json"


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.config.schema import ModelConfig
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(TINY_LLAMA)))


def _packed_data(tokenizer, max_seq_len=160):
    """A mix of formats and lengths, packed: chat, alpaca (with a long sample) and plain text."""
    from trainer.config.schema import DataConfig, DataSourceConfig
    from trainer.data import prepare_datasets

    cfg = DataConfig(sources=[DataSourceConfig(path=str(DATA / "alpaca.json")),
                              DataSourceConfig(path=str(DATA / "chat.jsonl"), format="chat"),
                              DataSourceConfig(path=str(DATA / "text.txt"), format="text")],
                     val_ratio=0.0, template="chatml", max_seq_len=max_seq_len, packing=True)
    return prepare_datasets(cfg, tokenizer, seed=0)


def test_best_fit_decreasing_places_every_sample_once_within_capacity():
    import numpy as np

    from trainer.data.packing import best_fit_decreasing

    lengths = np.random.default_rng(1).integers(1, 300, size=2000).tolist()
    bins = best_fit_decreasing(lengths, 300)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 300 for b in bins)
    assert best_fit_decreasing([5, 3, 2, 5], 5) == [[0], [3], [1, 2]]  # longest first, tightest fit
    with pytest.raises(ValueError):
        best_fit_decreasing([6], 5)


def _report(label: str, packed: float, padded: float) -> None:
    print(f"\n{label}: packing efficiency {100 * packed:.1f}% vs unpacked micro batches of 8 {100 * padded:.1f}%")


def test_packing_efficiency_on_alpaca_like_lengths_at_512_is_at_least_95_percent():
    """Alpaca's token lengths are roughly log-normal (median ~140, long tail), truncated at max_seq_len."""
    import numpy as np

    from trainer.data.packing import best_fit_decreasing, padding_efficiency

    lengths = np.clip(np.random.default_rng(0).lognormal(np.log(140), 0.6, 20000).astype(int), 16, 512)
    bins = best_fit_decreasing(lengths.tolist(), 512)
    packed = lengths.sum() / (len(bins) * 512)
    padded = padding_efficiency(lengths, 8)
    _report("alpaca-like lengths (20k samples)", packed, padded)
    assert packed >= 0.95
    assert padded < 0.6  # what packing is for: unpacked batches spend ~half their slots on padding


@pytest.mark.skipif(not SHARED_ALPACA.is_file(), reason="the shared Alpaca sample is not on this machine")
def test_packing_efficiency_on_the_real_alpaca_sample(tokenizer):
    from trainer.config.schema import DataConfig
    from trainer.data import prepare_datasets
    from trainer.data.packing import padding_efficiency

    cfg = DataConfig(path=str(SHARED_ALPACA), val_ratio=0.0, template="alpaca", max_seq_len=512, packing=True)
    data = prepare_datasets(cfg, tokenizer, seed=0)
    padded = padding_efficiency(data.train.table.lengths, 8)
    _report("alpaca_100.json", data.train.efficiency, padded)
    assert data.train.efficiency >= 0.95 and data.report.packing_efficiency == data.train.efficiency


def test_packed_rows_restart_positions_and_attend_only_within_each_sample(tokenizer):
    from trainer.data.loader import collate

    data = _packed_data(tokenizer)
    row = max((data.train[i] for i in range(len(data.train))), key=lambda r: len(r.samples))
    other = min((data.train[i] for i in range(len(data.train))), key=len)
    assert len(row.samples) >= 3 and len(other) < len(row)
    batch = collate([row, other], tokenizer.pad_token_id)
    mask, positions = batch.inputs["attention_mask"], batch.inputs["position_ids"]
    assert mask.dtype == torch.bool and mask.shape == (2, 1, len(row), len(row))
    start = 0
    for sample in row.samples:
        end = start + len(sample)
        assert positions[0, start:end].tolist() == list(range(len(sample)))
        block = mask[0, 0, start:end]
        assert block[:, start:end].equal(torch.ones(len(sample), len(sample), dtype=torch.bool).tril())
        assert not block[:, :start].any() and not block[:, end:].any()
        assert batch.labels[0, start] == -100  # nothing of the previous sample predicts this sample's first token
        start = end
    assert mask[1, 0].diagonal().all()  # padding attends to itself: no empty softmax row
    assert batch.num_tokens == len(row) + len(other)
    eager = collate([row, other], tokenizer.pad_token_id, attention="eager").inputs["attention_mask"]
    assert eager.dtype == torch.float32 and ((eager == 0) == mask).all()
    flat = collate([row, other], tokenizer.pad_token_id, attention="flash_attention_2")
    assert flat.inputs.keys() == {"input_ids", "position_ids"}
    assert flat.inputs["input_ids"].shape == (1, len(row) + len(other))


@pytest.mark.parametrize("attention", ["sdpa", "eager", "flash_attention_2"])
def test_packed_and_unpacked_batches_give_the_same_loss_and_gradients(tokenizer, attention):
    """fp32, the embedded model. flash_attention_2 needs a GPU; its flattened layout is checked here under sdpa,
    where Transformers turns the restarting position ids into the same per-sample mask."""
    from transformers import AutoModelForCausalLM

    from trainer.data.loader import Batch, collate
    from trainer.evaluate import token_loss_sum

    model_attention = "sdpa" if attention == "flash_attention_2" else attention
    model = AutoModelForCausalLM.from_pretrained(TINY_LLAMA, dtype=torch.float32, attn_implementation=model_attention)
    data = _packed_data(tokenizer)
    # The rows holding the most samples, and one alone: enough to show cross-talk, small enough to be quick.
    rows = sorted((data.train[i] for i in range(len(data.train))), key=lambda r: -len(r.samples))
    rows = rows[:3] + rows[-1:]
    assert len(rows[0].samples) >= 3 and len(rows[-1].samples) == 1

    def loss_and_grads(batch):
        model.zero_grad()
        loss = token_loss_sum(model(**batch.inputs).logits, batch.labels)
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    packed = collate(rows, tokenizer.pad_token_id, attention)
    packed_loss, packed_grads = loss_and_grads(packed)
    samples = [sample for row in rows for sample in row.samples]
    unpacked_loss, unpacked_grads = loss_and_grads(collate(samples, tokenizer.pad_token_id))
    assert sum(row.num_label_tokens for row in rows) == sum(s.num_label_tokens for s in samples)
    torch.testing.assert_close(packed_loss, unpacked_loss, rtol=1e-5, atol=0)
    for name, grad in unpacked_grads.items():
        # Relative to the tensor's scale: the same sums taken in another order move elements by float32 rounding
        # (measured: up to ~2e-5 of the largest element); attention across samples moves them by percents.
        worst = (packed_grads[name] - grad).abs().max() / grad.abs().max()
        assert worst < 1e-4, f"{name}: packed and unpacked gradients differ by {worst:.2e} of the largest element"
    if attention == "sdpa":  # the control: the same packed rows without the mask and positions do cross-talk
        leaky_loss, leaky_grads = loss_and_grads(Batch({"input_ids": packed.inputs["input_ids"]}, packed.labels, 0))
        assert abs(leaky_loss - unpacked_loss) / unpacked_loss > 1e-3
        assert max((leaky_grads[n] - g).abs().max() / g.abs().max() for n, g in unpacked_grads.items()) > 1e-2


def test_sampler_resumes_exactly_and_is_the_same_on_any_world_size_with_packed_rows(tokenizer):
    from trainer.data.loader import GlobalBatchSampler, local_microbatches

    data = _packed_data(tokenizer, max_seq_len=96)
    num_rows = len(data.train)
    reference = GlobalBatchSampler(num_rows, 4, seed=3, data_fingerprint=data.fingerprint)
    batches = [reference.next_global_batch() for _ in range(7)]  # crosses an epoch boundary
    for world_size in (1, 2, 4):
        per_rank = [local_microbatches(batches[2], rank, world_size, 4 // world_size) for rank in range(world_size)]
        assert sorted(i for rank in per_rank for micro in rank for i in micro) == sorted(batches[2])
    resumed = GlobalBatchSampler(num_rows, 4, seed=3, data_fingerprint=data.fingerprint)
    replay = GlobalBatchSampler(num_rows, 4, seed=3, data_fingerprint=data.fingerprint)
    for _ in range(3):
        replay.next_global_batch()
    resumed.load_state_dict(replay.state_dict())
    assert [resumed.next_global_batch() for _ in range(4)] == batches[3:]
    stranger = GlobalBatchSampler(num_rows, 4, seed=3, data_fingerprint="other-rows")
    with pytest.raises(ValueError, match="other data rows"):
        stranger.load_state_dict(replay.state_dict())


def test_rows_are_the_same_whatever_the_order_they_are_built_in(tokenizer):
    first, second = _packed_data(tokenizer), _packed_data(tokenizer)
    assert first.fingerprint == second.fingerprint
    assert [first.train[i].input_ids.tolist() for i in range(len(first.train))] == [
        second.train[i].input_ids.tolist() for i in range(len(second.train))]
