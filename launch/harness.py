"""`trainer eval SOURCE --harness TASK[,TASK...]`: standard benchmarks through EleutherAI's lm-evaluation-harness.

The harness runs on the model object `trainer eval` loaded (launch/generate.py load_models): a full or merged model,
or the base with each adapter attached and made active in turn, so base and fine-tunes are compared on one copy of
the weights, as for the project's own metrics. Task names are the harness's own (on a connected machine any of its
tasks: the harness downloads their data); `--harness-include DIR` adds task definitions of your own, e.g. a YAML
whose `dataset_path: json` names a local file, which is all that works on a machine without the hub.

An optional extra: `pip install -e '.[harness]'` (lm_eval with its scikit-learn, evaluate, ... dependencies).
"""

from __future__ import annotations

import contextlib
import os

from trainer.errors import UserError


def parse_tasks(spec: str) -> list[str]:
    tasks = [name.strip() for name in spec.split(",") if name.strip()]
    if not tasks:
        raise UserError("eval: --harness takes task names, e.g. --harness hellaswag,arc_easy")
    return tasks


def check_harness(tasks: list[str], include: str | None):
    """The harness's task manager, once the package, the include dir and every task name are known to be there."""
    if include and not os.path.isdir(include):
        raise UserError(f"eval: --harness-include {include!r} is not a directory of task YAML files")
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval: --harness needs EleutherAI's lm-evaluation-harness: pip install -e '.[harness]'") \
            from None
    import logging

    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # its per-task notices; results come back as our table
    manager = TaskManager(include_path=include)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            from trainer.config.suggest import suggest_option

            close = suggest_option(task, sorted(known))
            hint = f"did you mean {close}? " if close else ""
            raise UserError(f"eval: --harness: {task!r} is no lm-evaluation-harness task; {hint}a task of your own: "
                            "--harness-include DIR with its YAML")
    return manager


def run_harness(model, tokenizer, names: list[str], base_too: bool, tasks: list[str], manager, limit: int,
                batch_size: int) -> dict[str, dict[str, float]]:
    """{target: {"TASK/METRIC[/FILTER]": value}} for the base (when asked, or alone) and each adapter; the stderr
    columns are left out."""
    import torch
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    # One wrapper for every target: it calls the model object, whose active adapter changes between targets.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    results = {}
    targets = (["base"] if base_too or not names else []) + names
    for target in targets:
        if target == "base":
            context = model.disable_adapter() if names else contextlib.nullcontext()
        else:
            model.set_adapter(target)
            context = contextlib.nullcontext()
        with context:
            out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit or None,
                                  log_samples=False)
        results[target] = {metric_name(task, metric): float(value)
                           for task, metrics in out["results"].items() for metric, value in metrics.items()
                           if isinstance(value, (int, float)) and not isinstance(value, bool)
                           and "stderr" not in metric and metric != "sample_len"}
    return results


def metric_name(task: str, metric: str) -> str:
    """TASK/METRIC, and /FILTER where the harness names one (gsm8k's exact_match,strict-match and
    exact_match,flexible-extract are two figures)."""
    name, _, applied = metric.partition(",")
    return f"{task}/{name}" if applied in ("", "none") else f"{task}/{name}/{applied}"
