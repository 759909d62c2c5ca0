"""EWC and L2 towards the starting weights (trainer/regularize.py): the penalty is zero where training starts, its
gradient is the analytic one, and the Fisher is the mean of per-sample squared gradients (two DDP ranks against one
process: tests/distributed/test_strategies.py)."""

from __future__ import annotations

import types

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from tests.unit.test_chunked_loss import tiny_model  # noqa: E402
from trainer.data.encode import IGNORE_INDEX, EncodedSample  # noqa: E402
from trainer.objectives.sft import SFTObjective  # noqa: E402
from trainer.regularize import WeightAnchor, estimate_fisher  # noqa: E402


def tiny_llama():
    return tiny_model("llama-3.1", vocab_size=300)


def rows(count: int = 3):
    torch.manual_seed(2)
    out = []
    for length in range(9, 9 + count):
        ids = torch.randint(3, 300, (length,)).tolist()
        out.append(EncodedSample(ids, [IGNORE_INDEX] * 3 + ids[3:]))  # a masked prompt, as instruction data
    return out


SINGLE = types.SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"),
                               autocast=lambda: torch.autocast("cpu", enabled=False))


def test_the_penalty_is_zero_at_the_start_and_its_gradient_is_the_analytic_one():
    model = tiny_llama()
    params = {n: p for n, p in model.named_parameters() if "mlp" in n}
    start = {n: p.detach().clone() for n, p in params.items()}
    torch.manual_seed(3)
    fisher = {n: torch.rand_like(p) for n, p in params.items()}
    anchor = WeightAnchor(params, start, fisher, ewc_lambda=40.0, l2_lambda=0.5)
    total, terms = anchor.penalty()
    assert float(total.detach()) == 0.0 and set(terms) == {"ewc_penalty", "l2_penalty"}

    with torch.no_grad():
        for p in params.values():
            p.add_(torch.randn_like(p) * 0.01)
    total, terms = anchor.penalty()
    total.backward()
    for name, p in params.items():
        delta = p.detach() - start[name]
        expected = 40.0 * fisher[name] * delta + 0.5 * delta
        torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-9)
    expected_ewc = 20.0 * sum(float((fisher[n] * (p.detach() - start[n]) ** 2).sum()) for n, p in params.items())
    assert float(terms["ewc_penalty"].detach()) == pytest.approx(expected_ewc, rel=1e-5)


def test_the_fisher_is_the_mean_of_per_sample_squared_gradients_of_the_mean_token_loss():
    model = tiny_llama().train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    objective = SFTObjective(model, chunk_tokens=4, log=lambda message: None)  # several chunks: recomputed backward
    samples = rows(3)
    fisher = estimate_fisher(model, params, samples, SINGLE, objective, pad_id=0)
    assert all(p.grad is None for p in params.values())  # nothing leaks into the first step's gradients
    assert model.training

    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for sample in samples:
        model.zero_grad(set_to_none=True)
        ids = torch.tensor([sample.input_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        labels = torch.tensor(sample.labels[1:])
        torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).backward()
        for n, p in params.items():
            expected[n] += p.grad ** 2 / len(samples)
    for n in params:  # fp32: sums of squares of gradients that differ in the order of their additions
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-6 * float(expected[n].max()))
    assert sum(float(f.sum()) for f in fisher.values()) > 0
