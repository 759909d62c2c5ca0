"""Generation metrics of answers against references, by name: what `eval.metrics` and `trainer eval` report.

exact_match and token_f1 are SQuAD-style (trainer/evaluate.py normalises the text); bleu is sacrebleu's corpus BLEU
and rouge1/rouge2/rougeL are rouge-score's stemmed F-measures, averaged over the answers -- the field's own
implementations, imported only when asked for (the `eval` extra). All are 0-1. BLEU is a corpus statistic, not a
mean over answers, so distributed evaluation gathers every rank's answers before scoring (trainer/evaluate.py).
"""

from __future__ import annotations

import importlib.util

GENERATION_METRICS = ("exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL")
ROUGE = ("rouge1", "rouge2", "rougeL")
# Which package each metric needs beyond the project's own code.
PACKAGES = {"bleu": "sacrebleu", **{name: "rouge_score" for name in ROUGE}}


def missing_package(names) -> str | None:
    """The first package that a metric of NAMES needs and this environment lacks, or None."""
    for name in names:
        package = PACKAGES.get(name)
        if package and importlib.util.find_spec(package) is None:
            return package
    return None


def score_answers(answers: list[str], references: list[str], names=GENERATION_METRICS) -> dict:
    """{metric: value} for each of NAMES, over the answers and their references (in order)."""
    from trainer.evaluate import normalize_answer, token_f1

    if len(answers) != len(references):
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    count = max(len(answers), 1)
    pairs = list(zip(answers, references))
    result = {}
    if "exact_match" in names:
        result["exact_match"] = sum(normalize_answer(a) == normalize_answer(r) for a, r in pairs) / count
    if "token_f1" in names:
        result["token_f1"] = sum(token_f1(a, r) for a, r in pairs) / count
    if "bleu" in names:
        import sacrebleu

        result["bleu"] = sacrebleu.corpus_bleu(answers, [references]).score / 100
    wanted = [key for key in ROUGE if key in names]
    if wanted:
        from rouge_score import rouge_scorer

        scorer = rouge_scorer.RougeScorer(wanted, use_stemmer=True)
        totals = dict.fromkeys(wanted, 0.0)
        for answer, reference in pairs:
            for key, score in scorer.score(reference, answer).items():
                totals[key] += score.fmeasure
        result.update({key: value / count for key, value in totals.items()})
    return result
