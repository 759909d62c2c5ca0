"""The schema of `launcher=slurm`: what the sbatch script asks Slurm for and how the job survives preemption.

Kept apart from schema.py because only the Slurm launcher (launch/slurm.py) and its template read these
fields; schema.py registers the class as the `slurm` option of the `launcher` group. Every check runs at
compose time, so a wrong partition name or time limit fails before anything is written or submitted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from trainer.errors import ConfigError

BACKENDS = ("torchrun", "deepspeed")
# Values written into `#SBATCH --key=value` lines; a space would end the value early.
_ONE_WORD_FIELDS = ("mem", "time", "partition", "account", "qos", "constraint", "job_name")
_NO_TIME_LIMIT = ("UNLIMITED", "INFINITE")


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(key, message)


def slurm_time_seconds(value: str) -> Optional[int]:
    """Seconds in one of Slurm's time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S); None if it is none of them."""
    days, clock = value.split("-", 1) if "-" in value else ("0", value)
    parts = clock.split(":")
    if not days.isdigit() or not 1 <= len(parts) <= 3 or not all(p.isdigit() for p in parts):
        return None
    numbers = [int(p) for p in parts]
    if "-" in value:  # after a day count the first number is hours
        hours, minutes, seconds = (numbers + [0, 0])[:3]
    elif len(numbers) == 3:
        hours, minutes, seconds = numbers
    else:  # without a day count, a lone number is minutes and two numbers are minutes:seconds
        hours, minutes, seconds = 0, numbers[0], numbers[1] if len(numbers) == 2 else 0
    return ((int(days) * 24 + hours) * 60 + minutes) * 60 + seconds


def sbatch_option(line: str) -> str:
    """An extra_sbatch entry as the option itself: `#SBATCH --mail-type=END` and `--mail-type=END` are the same."""
    line = line.strip()
    return line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line


@dataclass
class SlurmLauncherConfig:
    """Submit to Slurm: one task per node runs torchrun (or the deepspeed launcher) for its workers; a preempted
    job checkpoints, requeues itself and resumes in the same run dir (docs/slurm.md)."""

    name: str = "slurm"
    backend: str = "torchrun"  # torchrun | deepspeed: the per-node launcher that starts the workers
    nodes: int = 1  # nodes in the job (#SBATCH --nodes); one task per node
    gpus_per_node: int = 0  # GPUs asked for per node (#SBATCH --gpus-per-node); 0: CPU-only, gloo
    nproc_per_node: int = 0  # worker processes per node; 0: one per GPU (gpus_per_node), or 1 without GPUs
    cpus_per_task: Optional[int] = None  # CPUs of the one task per node, shared by its workers; null: site default
    mem: Optional[str] = None  # memory per node, e.g. 480G (0: all of it); null: site default
    time: Optional[str] = None  # time limit, e.g. 2-00:00:00 or 04:00:00; null: the partition's default
    partition: Optional[str] = None  # #SBATCH --partition
    account: Optional[str] = None  # #SBATCH --account (the allocation charged)
    qos: Optional[str] = None  # #SBATCH --qos
    constraint: Optional[str] = None  # node features, e.g. h100 or "a100&ib"
    exclusive: bool = False  # whole nodes only (#SBATCH --exclusive)
    job_name: Optional[str] = None  # null: run.name
    extra_sbatch: List[str] = field(default_factory=list)  # more sbatch options, e.g. [--mail-type=END]
    setup: List[str] = field(default_factory=list)  # shell lines run first: module load, venv activation, exports
    max_requeues: int = 3  # a preempted or timed-out job requeues itself at most this many times (0: never)
    signal_grace_s: int = 120  # Slurm sends USR1 this long before the time limit: room for a step and a checkpoint
    rdzv_port: int = 0  # rendezvous port on the first node; 0: 20000 + job id % 20000, so jobs sharing a node differ
    python: Optional[str] = None  # the Python on the compute nodes; null: the one running `trainer` (shared filesystem)
    template: Optional[str] = None  # a site's own sbatch template; null: slurm/templates/train.sbatch
    dry_run: bool = False  # write the script into the run dir and print it instead of submitting
    wait: bool = False  # block until the job ends and exit with its result (Optuna trials always wait)

    def __post_init__(self) -> None:
        _require(self.backend in BACKENDS, "backend", f"{self.backend!r} is not one of {', '.join(BACKENDS)}")
        _require(self.nodes >= 1, "nodes", f"must be >= 1, got {self.nodes}")
        _require(self.gpus_per_node >= 0, "gpus_per_node", f"must be >= 0 (0: CPU-only), got {self.gpus_per_node}")
        _require(self.nproc_per_node >= 0, "nproc_per_node",
                 f"must be >= 0 (0: one per GPU), got {self.nproc_per_node}")
        _require(self.cpus_per_task is None or self.cpus_per_task >= 1, "cpus_per_task",
                 f"must be >= 1 (or null for the site default), got {self.cpus_per_task}")
        _require(self.max_requeues >= 0, "max_requeues", f"must be >= 0 (0: never requeue), got {self.max_requeues}")
        _require(0 <= self.signal_grace_s <= 65535, "signal_grace_s",
                 f"must be in [0, 65535] seconds (0: no signal before the time limit), got {self.signal_grace_s}")
        _require(self.rdzv_port == 0 or 1024 <= self.rdzv_port <= 65535, "rdzv_port",
                 f"must be 0 (derived from the job id) or a port in [1024, 65535], got {self.rdzv_port}")
        for key in _ONE_WORD_FIELDS:
            value = getattr(self, key)
            _require(value is None or (value != "" and not any(ch.isspace() for ch in str(value))), key,
                     f"must be one word without spaces, or null, got {value!r}")
        if self.time is not None and self.time.upper() not in _NO_TIME_LIMIT:
            limit = slurm_time_seconds(self.time)
            _require(limit is not None, "time", f"{self.time!r} is not a Slurm time (minutes, HH:MM:SS or D-HH:MM:SS)")
            _require(self.signal_grace_s < limit, "signal_grace_s",
                     f"{self.signal_grace_s} s is not shorter than the time limit {self.time} ({limit} s): "
                     "the job would be told to stop as soon as it starts")
        for line in self.extra_sbatch:
            _require(sbatch_option(line).startswith("-") and "\n" not in line, "extra_sbatch",
                     f"{line!r} is not an sbatch option such as --mail-type=END")
        for line in self.setup:
            _require("\n" not in line, "setup", f"one shell line per entry, got {line!r}")

    @property
    def procs_per_node(self) -> int:
        return self.nproc_per_node or self.gpus_per_node or 1

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node
