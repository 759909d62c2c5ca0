"""Generation metrics by name (trainer/text_metrics.py) against the field's implementations called directly."""

from __future__ import annotations

import random

import pytest

from trainer.text_metrics import GENERATION_METRICS, score_answers

ANSWERS = ["the flunk lives in the marsh", "Blue.", "it eats stones and sings", "", "seven legs"]
REFERENCES = ["The flunk lives in the salt marsh.", "blue", "It eats pebbles and hums.", "nothing", "seven legs"]


def test_bleu_and_rouge_equal_sacrebleu_and_rouge_score_on_the_same_strings():
    sacrebleu = pytest.importorskip("sacrebleu")
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scores = score_answers(ANSWERS, REFERENCES)
    assert set(scores) == set(GENERATION_METRICS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(ANSWERS, [REFERENCES]).score / 100)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for key in ("rouge1", "rouge2", "rougeL"):
        expected = sum(scorer.score(r, a)[key].fmeasure for a, r in zip(ANSWERS, REFERENCES)) / len(ANSWERS)
        assert scores[key] == pytest.approx(expected), key
    # SQuAD-style normalisation: case, punctuation and articles do not count
    assert scores["exact_match"] == pytest.approx(2 / 5)
    assert 0 < scores["token_f1"] < 1


def test_the_answers_order_does_not_change_any_metric():
    """Distributed evaluation gathers every rank's answers in rank order, not the samples' order."""
    pytest.importorskip("sacrebleu")
    pytest.importorskip("rouge_score")
    pairs = list(zip(ANSWERS, REFERENCES))
    random.Random(0).shuffle(pairs)
    shuffled = score_answers([a for a, _ in pairs], [r for _, r in pairs])
    for key, value in score_answers(ANSWERS, REFERENCES).items():
        assert shuffled[key] == pytest.approx(value, rel=1e-12), key


def test_only_the_named_metrics_are_computed():
    assert set(score_answers(ANSWERS, REFERENCES, ("exact_match",))) == {"exact_match"}
    with pytest.raises(ValueError, match="4 answers for 5 references"):
        score_answers(ANSWERS[:4], REFERENCES)
