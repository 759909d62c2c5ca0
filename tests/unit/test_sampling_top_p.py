"""Sampling in greedy_generate: the top-p nucleus on hand-made distributions, seeded draws, and the system message
that `trainer generate --system` puts before a conversation."""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from launch.generate import Request, render
from trainer.data.templates import get_template
from trainer.errors import UserError
from trainer.evaluate import _sample_next, greedy_generate, top_p_filter

TINY = str(Path(__file__).resolve().parents[2] / "trainer" / "assets" / "tiny-llama")
PROBS = torch.tensor([0.10, 0.50, 0.15, 0.25])  # ranked: 1 (0.50), 3 (0.25), 2 (0.15), 0 (0.10)


def _kept(probs: torch.Tensor, top_p: float) -> set[int]:
    return set(top_p_filter(probs, top_p).nonzero().flatten().tolist())


@pytest.mark.parametrize("top_p, kept", [
    (1e-6, {1}),  # the top token always survives
    (0.4, {1}),
    (0.6, {1, 3}),  # 0.50 falls short of 0.6, so the next token is needed to reach it
    (0.74, {1, 3}),
    (0.8, {1, 3, 2}),
    (0.95, {1, 3, 2, 0}),
    (1.0, {1, 3, 2, 0}),
])
def test_top_p_keeps_the_smallest_most_likely_set_that_reaches_p(top_p, kept):
    assert _kept(PROBS, top_p) == kept
    filtered = top_p_filter(PROBS, top_p)
    assert torch.equal(filtered[list(kept)], PROBS[list(kept)])  # survivors keep their probability


def test_top_p_filters_each_row_alone_and_breaks_ties_by_the_first_token():
    rows = torch.stack([PROBS, torch.tensor([0.3, 0.3, 0.4, 0.0])])
    filtered = top_p_filter(rows, 0.6)
    assert set(filtered[0].nonzero().flatten().tolist()) == {1, 3}
    assert set(filtered[1].nonzero().flatten().tolist()) == {2, 0}  # tied 0.3s: the lower id ranks first


def test_sampling_draws_only_from_the_nucleus_and_repeats_with_a_seed():
    logits = PROBS.log().repeat(2000, 1)
    draws = _sample_next(logits, 1.0, 0.6, torch.Generator().manual_seed(0))
    assert set(draws.tolist()) == {1, 3}
    assert torch.equal(draws, _sample_next(logits, 1.0, 0.6, torch.Generator().manual_seed(0)))
    assert not torch.equal(draws, _sample_next(logits, 1.0, 0.6, torch.Generator().manual_seed(1)))
    assert (draws == 1).float().mean().item() == pytest.approx(0.5 / 0.75, abs=0.05)  # renormalised in the nucleus
    # a temperature near 0 is greedy, without overflowing into nan
    assert set(_sample_next(logits, 1e-30, 1.0, torch.Generator().manual_seed(0)).tolist()) == {1}


def test_greedy_generate_samples_only_when_asked():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(TINY).eval()
    tokenizer = AutoTokenizer.from_pretrained(TINY)
    prompts = ["The flunk lives in the", "Give the blazort"]

    def run(**sampling):
        return greedy_generate(model, tokenizer, prompts, 6, torch.device("cpu"), contextlib.nullcontext, **sampling)

    greedy = run()
    assert run(temperature=0.0, top_p=0.5, generator=torch.Generator().manual_seed(1)) == greedy
    assert run(temperature=1.0, top_p=1e-6, generator=torch.Generator().manual_seed(1)) == greedy
    sampled = run(temperature=1.5, generator=torch.Generator().manual_seed(1))
    assert run(temperature=1.5, generator=torch.Generator().manual_seed(1)) == sampled


def test_system_message_opens_conversations_without_their_own():
    tokenizer = SimpleNamespace(bos_token=None)
    chatml = get_template("chatml")
    plain, own = render([Request("hi"), Request("hi", messages=(("system", "Mine."), ("user", "hi")))], chatml,
                        tokenizer, system="Be brief.")
    assert plain == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert own.startswith("<|im_start|>system\nMine.<|im_end|>\n") and "Be brief." not in own
    assert render([Request("hi")], chatml, tokenizer) == ["<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"]


def test_a_template_that_rejects_the_conversation_is_one_line():
    class NoSystem:
        name = "tokenizer"

        def render(self, messages, add_generation_prompt):
            raise ValueError("System role not supported\n(raised in the template)")

    with pytest.raises(UserError, match=r"^generate: the tokenizer template rejected the conversation: System role "
                                        r"not supported \(choose another --template or drop --system\)$"):
        render([Request("hi")], NoSystem(), SimpleNamespace(bos_token=None), system="Be brief.")
