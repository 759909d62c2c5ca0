"""Release gates: "eval.exact_match>=0.6" checked against a run's metrics before it is registered or promoted.

A key is a metric as the registry records it (eval.exact_match, eval_before.loss, train_loss_last, ...); a bare
eval metric name (forgetting_increase) means the after-training figure, eval.<name>.
"""

from __future__ import annotations

import math
import operator
import re
from dataclasses import dataclass

from trainer.errors import UserError

_OPERATORS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne, ">": operator.gt,
              "<": operator.lt}
_PATTERN = re.compile(r"^\s*([A-Za-z_][\w./-]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str
    bound: float

    def __str__(self) -> str:
        return f"{self.key}{self.op}{self.bound:g}"


FORM = "expected METRIC OP NUMBER, e.g. eval.exact_match>=0.6 or forgetting_increase<=0.3 (OP: >= <= > < == !=)"


def is_requirement(text: str) -> bool:
    return isinstance(text, str) and bool(_PATTERN.match(text))


def parse_requirement(text: str) -> Requirement:
    match = _PATTERN.match(text)
    if not match:
        raise UserError(f"--require {text!r}: {FORM}")
    return Requirement(match.group(1), match.group(2), float(match.group(3)))


def metric_value(metrics: dict, key: str) -> float | None:
    if key in metrics:
        return metrics[key]
    return metrics.get(f"eval.{key}")


def first_failure(requirements: list[Requirement], metrics: dict) -> str | None:
    """Why the metrics fail the first requirement they fail (a missing or non-finite metric fails), or None."""
    for requirement in requirements:
        value = metric_value(metrics, requirement.key)
        if value is None:
            known = ", ".join(sorted(k for k in metrics if not k.startswith("eval_before.")))
            return f"{requirement} cannot be checked: the run has no metric {requirement.key} (it has: {known})"
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"{requirement} fails: {requirement.key} is {value}"
        if not _OPERATORS[requirement.op](value, requirement.bound):
            return f"{requirement} fails: {requirement.key} is {value:.4g}"
    return None
