"""Sweeps (`trainer train -m ...`): what each point needs, and `trainer sweep summary DIR`.

Each point of a Hydra multirun (a grid from the basic sweeper, or Optuna trials) runs in its own run dir, the
sweep's subdir `<hydra.sweep.dir>/<n>`, whatever run.dir says, so points never share checkpoints. All points
log to one W&B group (the sweep dir's name) unless logger.wandb.group is set. A point records its overrides in
`sweep_point.json`; the summary reads those and each run's summary.json into one CSV and one Markdown table,
with the best point by run.objective marked. With launcher=slurm the points are separate jobs, so the table
is complete once they end: `trainer sweep summary DIR` can be run at any time.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
from dataclasses import dataclass, field

from hydra.experimental.callback import Callback

from trainer.errors import EXIT_REQUEUE, UserError

POINT_FILE = "sweep_point.json"
TABLE_NAME = "sweep_summary"  # .csv and .md in the sweep dir
DEFAULT_OBJECTIVE = "eval_after.loss"
METRIC_COLUMNS = {"train_loss_last": "train_loss_last", "eval_loss": "eval_after.loss",
                  "eval_exact_match": "eval_after.exact_match"}

USAGE = """\
usage: trainer sweep summary DIR [--objective KEY] [--maximize | --minimize]

Write DIR/sweep_summary.csv and DIR/sweep_summary.md: one row per run dir under DIR (the points of
`trainer train -m`), with the overrides that differ between points, status, train loss and eval metrics from
each summary.json, and the best point by KEY marked (default: run.objective of the runs, else eval_after.loss;
losses and perplexities are minimised, other metrics maximised unless --maximize/--minimize says otherwise).
"""


# ------------------------------------------------------------------------------------- each point of a sweep
def prepare_point(cfg) -> dict | None:
    """In a multirun, point run.dir at the sweep subdir and share one W&B group; None outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN:
        return None
    overrides = list(hydra_cfg.overrides.task)
    if any(override.lstrip("+~").split("=", 1)[0] == "run.dir" for override in overrides):
        sys.stderr.write("[trainer] run.dir is ignored in a sweep: each point runs in <hydra.sweep.dir>/<n> "
                         "(set hydra.sweep.dir to choose where)\n")
    sweep_dir = os.path.abspath(hydra_cfg.sweep.dir)
    cfg.run.dir = os.path.abspath(hydra_cfg.runtime.output_dir)
    if cfg.logger.wandb.group is None:
        cfg.logger.wandb.group = os.path.basename(sweep_dir)
    # hydra.sweeper.params: the searched keys (Optuna), listed even when two trials happen to pick the same value.
    searched = sorted((hydra_cfg.sweeper.get("params") or {}).keys())
    return {"sweep_dir": sweep_dir, "num": hydra_cfg.job.num, "overrides": overrides, "searched": searched,
            "sweeper": str(hydra_cfg.sweeper.get("_target_", ""))}


def needs_result(point: dict | None) -> bool:
    """Optuna decides the next trials from this one's value, so the run must have finished before we return."""
    return point is not None and "optuna" in point["sweeper"].lower()


def record_point(run_dir: str, point: dict) -> None:
    with open(os.path.join(run_dir, POINT_FILE), "w") as fh:
        json.dump(point, fh, indent=2)


def metric(summary: dict, key: str) -> float | None:
    """A dotted key of summary.json (`eval_after.loss`) as a float; None when absent."""
    value = summary
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def objective_value(run_dir: str, key: str) -> float | None:
    """The value a sweeper optimises; NaN (a failed trial to Optuna) when the run has no such metric."""
    summary = _read_json(os.path.join(run_dir, "summary.json"))
    if summary is None:
        return None
    value = metric(summary, key)
    return math.nan if value is None else value


# ------------------------------------------------------------------------------------------------ the table
@dataclass
class Point:
    name: str
    run_dir: str
    overrides: dict = field(default_factory=dict)
    searched: list = field(default_factory=list)
    summary: dict | None = None
    objective: str = DEFAULT_OBJECTIVE
    job_id: str | None = None
    failed: bool = False

    @property
    def status(self) -> str:
        if self.summary is not None:
            return str(self.summary.get("status", "unknown"))
        if self.failed:
            return "failed"
        return f"submitted (job {self.job_id})" if self.job_id else "no summary"


def collect_points(sweep_dir: str) -> list[Point]:
    """Every run dir directly under sweep_dir (a subdir with config.yaml), in job order."""
    if not os.path.isdir(sweep_dir):
        raise UserError(f"sweep summary: {sweep_dir!r} is not a directory")
    names = [n for n in os.listdir(sweep_dir) if os.path.isfile(os.path.join(sweep_dir, n, "config.yaml"))]
    names.sort(key=lambda n: (0, int(n), "") if n.isdigit() else (1, 0, n))
    points = []
    for name in names:
        run_dir = os.path.join(sweep_dir, name)
        record = _read_json(os.path.join(run_dir, POINT_FILE)) or {}
        config = _read_yaml(os.path.join(run_dir, "config.yaml"))
        overrides = dict(o.lstrip("+~").split("=", 1) for o in record.get("overrides", []) if "=" in o)
        points.append(Point(
            name=name, run_dir=run_dir, overrides=overrides or _flatten(config), searched=record.get("searched", []),
            summary=_read_json(os.path.join(run_dir, "summary.json")),
            objective=str((config.get("run") or {}).get("objective") or DEFAULT_OBJECTIVE),
            job_id=_read_text(os.path.join(run_dir, "slurm_job_id")),
            failed=_has_failure_record(run_dir)))
    if not points:
        raise UserError(f"sweep summary: no run dirs (subdirs with config.yaml) in {sweep_dir}")
    return points


def swept_keys(points: list[Point]) -> list[str]:
    """The swept parameters: overrides that differ between points, and the keys a sweeper searched."""
    keys = sorted({k for p in points for k in p.overrides})
    searched = {k for p in points for k in p.searched}
    varying = [k for k in keys if k in searched or len({str(p.overrides.get(k)) for p in points}) > 1]
    ignored = {"run.dir", "hydra.sweep.dir", "logger.wandb.group"}
    return [k for k in (varying if len(points) > 1 else keys) if k not in ignored]


def best_point(points: list[Point], objective: str, maximize: bool) -> Point | None:
    scored = [(metric(p.summary, objective), p) for p in points if p.summary is not None]
    scored = [(v, p) for v, p in scored if v is not None and math.isfinite(v)]
    if not scored:
        return None
    return (max if maximize else min)(scored, key=lambda item: item[0])[1]


def should_maximize(objective: str) -> bool:
    return not any(word in objective for word in ("loss", "perplexity"))


def build_table(points: list[Point], objective: str, maximize: bool) -> tuple[list[str], list[list[str]]]:
    keys = swept_keys(points)
    metric_columns = dict(METRIC_COLUMNS)
    if objective not in metric_columns.values():
        metric_columns[objective] = objective
    best = best_point(points, objective, maximize)
    header = ["run", *keys, "status", "steps", *metric_columns, "best"]
    rows = []
    for point in points:
        summary = point.summary or {}
        values = [_format(metric(summary, key)) for key in metric_columns.values()]
        rows.append([point.name, *(str(point.overrides.get(k, "")) for k in keys), point.status,
                     str(summary.get("steps", "")), *values, "best" if point is best else ""])
    return header, rows


def write_tables(sweep_dir: str, header: list[str], rows: list[list[str]], caption: str) -> tuple[str, str, str]:
    csv_path = os.path.join(sweep_dir, f"{TABLE_NAME}.csv")
    with open(csv_path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    lines = [f"# Sweep {os.path.basename(os.path.abspath(sweep_dir))}", "", caption, "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        cells = [f"**{cell}**" if row[-1] and cell else cell for cell in row]  # the best row in bold
        lines.append("| " + " | ".join(cells) + " |")
    markdown = "\n".join(lines) + "\n"
    md_path = os.path.join(sweep_dir, f"{TABLE_NAME}.md")
    with open(md_path, "w") as fh:
        fh.write(markdown)
    return csv_path, md_path, markdown


def _summary_keys(summary: dict, prefix: str = "") -> list[str]:
    """Every dotted key of summary.json that holds a number (eval_after.loss, tokens_per_second, ...)."""
    keys = []
    for key, value in summary.items():
        if isinstance(value, dict):
            keys += _summary_keys(value, f"{prefix}{key}.")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(f"{prefix}{key}")
    return keys


def _check_objective(points: list[Point], objective: str) -> None:
    """An objective no finished point has is a typo: refused before the tables are (over)written."""
    finished = [p.summary for p in points if p.summary is not None]
    if not finished or any(metric(summary, objective) is not None for summary in finished):
        return
    from trainer.config.suggest import suggest_option

    known = sorted({key for summary in finished for key in _summary_keys(summary)})
    close = suggest_option(objective, known)
    hint = f"did you mean {close}?" if close else f"summary.json has {', '.join(known[:10])}"
    raise UserError(f"sweep summary: --objective {objective!r} is in no point's summary.json; {hint}")


def summarize(sweep_dir: str, objective: str | None = None, maximize: bool | None = None) -> tuple[str, str, str]:
    """Write the sweep's CSV and Markdown tables; returns their paths and the Markdown."""
    points = collect_points(sweep_dir)
    objective = objective or points[0].objective
    _check_objective(points, objective)
    maximize = should_maximize(objective) if maximize is None else maximize
    header, rows = build_table(points, objective, maximize)
    done = sum(p.summary is not None for p in points)
    caption = (f"{len(points)} points, {done} with a summary; best by {objective} "
               f"({'highest' if maximize else 'lowest'}) is marked.")
    return write_tables(sweep_dir, header, rows, caption)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] != "summary":
        raise UserError(f"sweep: unknown subcommand {argv[0]!r}; use `trainer sweep summary DIR`")
    parser = argparse.ArgumentParser(prog="trainer sweep summary", add_help=False)
    parser.add_argument("dir")
    parser.add_argument("--objective")
    direction = parser.add_mutually_exclusive_group()
    direction.add_argument("--maximize", dest="maximize", action="store_true", default=None)
    direction.add_argument("--minimize", dest="maximize", action="store_false")
    args, unknown = parser.parse_known_args(argv[1:])
    if unknown:
        raise UserError(f"sweep summary: unknown arguments {' '.join(unknown)}; see `trainer sweep --help`")
    csv_path, md_path, markdown = summarize(args.dir, args.objective, args.maximize)
    sys.stdout.write(markdown)
    print(f"\ntables: {csv_path}, {md_path}")
    return 0


class SweepSummaryCallback(Callback):
    """Hydra callback (conf/train.yaml): the table at the end of every `trainer train -m`."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = os.path.abspath(str(config.hydra.sweep.dir))
        try:
            points = collect_points(sweep_dir)
        except UserError:
            return  # no point got as far as a run dir (validation failed): nothing to tabulate
        if not any(p.summary for p in points):
            print(f"sweep: {len(points)} points submitted; when they have finished: trainer sweep summary {sweep_dir}")
            return
        _, md_path, markdown = summarize(sweep_dir)
        sys.stdout.write(markdown)
        print(f"\nsweep summary: {md_path} (and .csv)")


# ------------------------------------------------------------------------------------------------ helpers
def _format(value: float | None) -> str:
    return "" if value is None else f"{value:.4f}"


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _read_text(path: str) -> str | None:
    try:
        with open(path) as fh:
            return fh.read().strip() or None
    except OSError:
        return None


def _read_yaml(path: str) -> dict:
    import yaml

    with open(path) as fh:
        return yaml.safe_load(fh) or {}


def _has_failure_record(run_dir: str) -> bool:
    """A worker recorded a failure other than a preemption checkpoint (trainer/worker.py writes .workers/)."""
    directory = os.path.join(run_dir, ".workers")
    if not os.path.isdir(directory):
        return False
    records = [_read_json(os.path.join(directory, name)) for name in os.listdir(directory)
               if name.startswith("rank-") and name.endswith(".json")]  # not the pids and requests beside them
    return any(r and r.get("exit_code") != EXIT_REQUEUE for r in records)


def _flatten(tree: dict, prefix: str = "") -> dict:
    """Dotted keys of a nested config, so runs made without a sweep can be compared by what differs."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat
