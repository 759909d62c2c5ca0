"""Release gates parse the way they read and fail on a missing or worse metric."""

from __future__ import annotations

import math

import pytest

from trainer.errors import UserError
from trainer.gate import first_failure, parse_requirement

METRICS = {"eval.exact_match": 0.65, "eval.forgetting_increase": 0.2, "eval_before.exact_match": 0.0,
           "train_loss_last": 0.3}


@pytest.mark.parametrize("text, passes", [
    ("eval.exact_match>=0.6", True), ("eval.exact_match>=0.65", True), ("eval.exact_match>0.65", False),
    ("exact_match >= 0.7", False), ("forgetting_increase<=0.3", True), ("forgetting_increase<0.2", False),
    ("train_loss_last<1e-1", False), ("eval_before.exact_match==0", True), ("eval.exact_match!=0.65", False),
])
def test_requirements_compare_as_written(text, passes):
    assert (first_failure([parse_requirement(text)], METRICS) is None) == passes


def test_missing_and_non_finite_metrics_fail_and_name_what_exists():
    missing = first_failure([parse_requirement("eval.bleu>=10")], METRICS)
    assert "no metric eval.bleu" in missing and "eval.exact_match" in missing
    assert "is nan" in first_failure([parse_requirement("eval.loss<=1")], {"eval.loss": math.nan})


@pytest.mark.parametrize("text", ["exact_match=>0.6", "eval.loss", ">=0.5", "eval.loss<=high", "eval.loss<<1"])
def test_malformed_requirements_are_refused(text):
    with pytest.raises(UserError, match="METRIC OP NUMBER"):
        parse_requirement(text)
