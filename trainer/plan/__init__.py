"""Memory and parameter planner behind ``trainer plan``: answers "what fits where" from config fields alone.

Pure Python, no torch import, so it answers in milliseconds before anything heavy is loaded. Modules:

* ``params``      exact parameter counts from Hugging Face config fields (``count_parameters``, ``load_arch``)
* ``trainable``   trainable parameters of full fine-tuning and the PEFT methods (``count_trainable``)
* ``activations`` activation and logits memory (Korthikanti et al. 2022, adapted to HF decoder layers)
* ``memory``      per-GPU and host memory of one setup (``PlanInputs``, ``estimate_memory``)
* ``table``       strategies x methods, smallest GPU counts, recommendation, ``strategy=auto``, text and JSON

Formulas and assumptions: docs/memory-planning.md.
"""

from trainer.plan.memory import GIB, STRATEGIES, MemoryEstimate, PlanInputs, estimate_memory
from trainer.plan.params import LinearModule, ParamCount, count_parameters, load_arch
from trainer.plan.table import (
    AutoChoice,
    FitCell,
    FitTable,
    choose_auto_strategy,
    estimate_to_json,
    render_estimate,
    render_table,
    to_json,
    what_fits,
)
from trainer.plan.trainable import PEFT_METHODS, TrainableCount, count_trainable

__all__ = [
    "GIB",
    "PEFT_METHODS",
    "STRATEGIES",
    "AutoChoice",
    "FitCell",
    "FitTable",
    "LinearModule",
    "MemoryEstimate",
    "ParamCount",
    "PlanInputs",
    "TrainableCount",
    "choose_auto_strategy",
    "count_parameters",
    "count_trainable",
    "estimate_memory",
    "estimate_to_json",
    "load_arch",
    "render_estimate",
    "render_table",
    "to_json",
    "what_fits",
]
