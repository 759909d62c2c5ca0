"""Render the sbatch script of a `launcher=slurm` run from slurm/templates/train.sbatch.

The template is bash with `{{ name }}` placeholders and no logic; everything that depends on the config (which
`#SBATCH` lines, which per-node launcher) is worked out here, so a site can bring its own template
(`launcher.template`) and keep the preemption protocol. Only the standard library is used: rendering a dry run
needs neither torch nor a cluster.
"""

from __future__ import annotations

import os
import re
import shlex
import string
import sys
from pathlib import Path

from trainer.config.schema import Config
from trainer.config.slurm_schema import SlurmLauncherConfig, sbatch_option
from trainer.errors import EXIT_REQUEUE, ConfigError, UserError

REPO_DIR = Path(__file__).resolve().parent.parent
DEFAULT_TEMPLATE = REPO_DIR / "slurm" / "templates" / "train.sbatch"
SCRIPT_NAME = "train.sbatch"
# Slurm expands %j to the job id; a requeued job keeps its id, so with --open-mode=append every run of the job
# writes to the same log.
LOG_PATTERN = "slurm-%j.out"
# Without launcher.rdzv_port, each job derives its own port, so two jobs that share a node do not collide.
DERIVED_PORT = "$((20000 + SLURM_JOB_ID % 20000))"
STEP_END_WAIT_S = 60


class _Placeholders(string.Template):
    """`{{ name }}` and nothing else: bash's own `$`, `${...}` and `@` stay untouched."""

    pattern = r"\{\{\s*(?P<braced>[a-z_]+)\s*\}\}|(?P<escaped>(?!))|(?P<named>(?!))|(?P<invalid>(?!))"


def sbatch_directives(launcher: SlurmLauncherConfig, run_dir: str, job_name: str) -> list[str]:
    """The `#SBATCH` lines, in the order a person would write them: shape, resources, placement, logs, requeue."""
    options = [f"--job-name={job_name}", f"--nodes={launcher.nodes}", "--ntasks-per-node=1"]
    if launcher.gpus_per_node:
        options.append(f"--gpus-per-node={launcher.gpus_per_node}")
    for key, option in (("cpus_per_task", "cpus-per-task"), ("mem", "mem"), ("time", "time"),
                        ("partition", "partition"), ("account", "account"), ("qos", "qos"),
                        ("constraint", "constraint")):
        value = getattr(launcher, key)
        if value is not None:
            options.append(f"--{option}={value}")
    if launcher.exclusive:
        options.append("--exclusive")
    options += [f"--output={run_dir}/{LOG_PATTERN}", "--open-mode=append"]
    if launcher.signal_grace_s:
        # B: signals only this batch script, which passes the signal on (see the template).
        options.append(f"--signal=B:USR1@{launcher.signal_grace_s}")
    options.append("--requeue" if launcher.max_requeues else "--no-requeue")
    options += [sbatch_option(line) for line in launcher.extra_sbatch]
    return [f"#SBATCH {option}" for option in options]


def node_launcher(launcher: SlurmLauncherConfig) -> str:
    """The command each node's task runs, as shell text for that node's own shell (variables expand there)."""
    procs = launcher.procs_per_node
    if launcher.backend == "deepspeed":
        # The deepspeed launcher without ssh: each node starts its own, told its rank; the hostfile lists the nodes.
        lines = ['"$PYTHON" -m deepspeed.launcher.runner --hostfile="$RUN_DIR/hostfile" --no_ssh '
                 '--node_rank="$SLURM_NODEID"',
                 '--master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT"',
                 '--module trainer.worker "$RUN_DIR"']
    elif launcher.nodes == 1:
        # --standalone: a private rendezvous on a free port, so single-node jobs sharing a node never clash.
        lines = [f'"$PYTHON" -m torch.distributed.run --standalone --nproc_per_node={procs} --max_restarts=0',
                 '-m trainer.worker "$RUN_DIR"']
    else:
        # The first node (MASTER_ADDR) hosts the rendezvous store, said explicitly: torchrun's own guess takes any
        # node for which MASTER_ADDR is a local or loopback address as a host, so two nodes on one machine (the dev
        # cluster, tests/slurm) could both serve the store and the agents split between them.
        lines = [f'"$PYTHON" -m torch.distributed.run --nnodes={launcher.nodes} --nproc_per_node={procs}',
                 '--rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$SLURM_JOB_ID"',
                 '--rdzv_conf=is_host=$([ "$SLURM_NODEID" = 0 ] && echo 1 || echo 0)',
                 "--max_restarts=0 -m trainer.worker \"$RUN_DIR\""]
    return " \\\n    ".join(lines)


def backend_setup(launcher: SlurmLauncherConfig) -> str:
    lines = []
    if launcher.backend == "deepspeed":
        lines += ["# The deepspeed launcher reads the nodes and their worker counts from a hostfile.",
                  f"scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/$/ slots={launcher.procs_per_node}/' "
                  '>"$RUN_DIR/hostfile"']
        if not launcher.gpus_per_node:
            lines.append('export DS_ACCELERATOR="${DS_ACCELERATOR:-cpu}"  # no GPUs asked for: DeepSpeed on CPU (gloo)')
    return "\n".join(lines) or "# (no launcher-specific setup)"


def srun_options(launcher: SlurmLauncherConfig) -> str:
    # Once one node's launcher has ended, the others get STEP_END_WAIT_S to end too, then the step is ended: a
    # crashed node does not leave the rest waiting in a collective until its timeout, yet after a preemption
    # checkpoint (a non-zero exit everywhere) a slower node, rank 0 writing its summary and closing W&B, is not
    # cut short the way --kill-on-bad-exit=1 would.
    options = [f"--nodes={launcher.nodes}", "--ntasks-per-node=1", "--kill-on-bad-exit=0", f"--wait={STEP_END_WAIT_S}"]
    if launcher.cpus_per_task is not None:
        # srun no longer inherits --cpus-per-task from sbatch (Slurm 22.05+): pass it to the step explicitly.
        options.append(f"--cpus-per-task={launcher.cpus_per_task}")
    return " ".join(options)


def render_sbatch(config: Config, python: str | None = None) -> str:
    """The job script for a validated config whose run.dir is absolute."""
    launcher: SlurmLauncherConfig = config.launcher
    run_dir = config.run.dir
    if not os.path.isabs(run_dir):
        raise ConfigError("run.dir", f"{run_dir!r} must be absolute for launcher=slurm (the job runs elsewhere)")
    if re.search(r"\s", run_dir):
        raise ConfigError("run.dir", f"{run_dir!r} contains whitespace, which #SBATCH --output cannot hold")
    template_path = Path(launcher.template) if launcher.template else DEFAULT_TEMPLATE
    try:
        template = _Placeholders(template_path.read_text())
    except OSError as err:
        raise ConfigError("launcher.template", f"cannot read {template_path}: {err.strerror}") from None
    values = {
        "template": _display_path(template_path),
        "script": f"{run_dir}/{SCRIPT_NAME}",
        "sbatch_directives": "\n".join(sbatch_directives(launcher, run_dir, launcher.job_name or config.run.name)),
        "signal_grace_s": str(launcher.signal_grace_s),
        "exit_requeue": str(EXIT_REQUEUE),
        "run_dir": shlex.quote(run_dir),
        "python": shlex.quote(launcher.python or python or sys.executable),
        "max_requeues": str(launcher.max_requeues),
        "setup": "\n".join(launcher.setup) or "# (none)",
        "master_port": str(launcher.rdzv_port) if launcher.rdzv_port else DERIVED_PORT,
        "backend_setup": backend_setup(launcher),
        "nodes": str(launcher.nodes),
        "procs_per_node": str(launcher.procs_per_node),
        "node_launcher": node_launcher(launcher),
        "srun_options": srun_options(launcher),
    }
    try:
        return template.substitute(values)
    except KeyError as err:
        raise UserError(f"{template_path}: unknown placeholder {{{{ {err.args[0]} }}}}; the template may use: "
                        f"{', '.join(sorted(values))}") from None


def _display_path(path: Path) -> str:
    """The template's path relative to the repository when it is the shipped one (stable across checkouts)."""
    try:
        return str(path.resolve().relative_to(REPO_DIR))
    except ValueError:
        return str(path)
