"""Fixtures for tests that run on a real Slurm cluster.

The session-scoped ``slurm_cluster`` fixture starts a private two-node cluster with
``slurm/dev-cluster/start.sh`` (in its own directory and on its own ports, so it never touches a
developer's dev cluster), exports its ``SLURM_CONF`` into ``os.environ`` for the code under test,
and stops it when the session ends.

Policy when the cluster cannot start: with ``CI=true`` the tests fail with start.sh's message (CI
must run them); elsewhere they are skipped with that message (not root, no apt-get, ...).
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
DEV_CLUSTER_DIR = REPO_ROOT / "slurm" / "dev-cluster"

# start.sh may run apt-get the first time on a fresh machine.
START_TIMEOUT_S = 600
STOP_TIMEOUT_S = 120
COMMAND_TIMEOUT_S = 30

# Job states after which a job will not run again by itself (REQUEUED / PENDING are not here).
FINISHED_STATES = frozenset(
    {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
)

# Variables that would make sbatch/srun think they run inside an existing allocation (when pytest
# itself runs in a Slurm job) or change their defaults behind the tests' back.
_LEAKY_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "slurm: runs on a real local Slurm cluster (the slurm_cluster fixture starts slurm/dev-cluster/start.sh)",
    )


# start.sh's own options pass through (SLURM_DEV_INSTALL=0, SLURM_DEV_ACCOUNTING=1, ...), except the
# two that would point the test cluster at a developer's running one.
_START_OPTIONS_KEPT_OUT = ("SLURM_DEV_DIR", "SLURM_DEV_PORT")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_LEAKY_ENV_PREFIXES) or (k.startswith("SLURM_DEV_") and k not in _START_OPTIONS_KEPT_OUT)
    }
    env.update(extra)
    return env


def _parse_exports(stdout: str) -> dict[str, str]:
    """Read the ``export KEY=VALUE`` lines that start.sh prints for ``eval``."""
    exports: dict[str, str] = {}
    for line in stdout.splitlines():
        words = shlex.split(line)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            key, value = words[1].split("=", 1)
            exports[key] = value
    return exports


def _last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "(no output)"


@dataclass
class SlurmCluster:
    """A running dev cluster plus small, bounded helpers to drive it from tests."""

    base_dir: Path
    conf: Path
    nodes: list[str] = field(default_factory=list)

    @property
    def log_dir(self) -> Path:
        return self.base_dir / "log"

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for Slurm commands: this cluster's SLURM_CONF and no inherited job variables."""
        return _clean_env(SLURM_CONF=str(self.conf), **extra)

    def run(
        self, args: list[str], *, input: str | None = None, timeout: float = COMMAND_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run a Slurm client command; raise with its stderr when it fails."""
        proc = subprocess.run(
            args, input=input, capture_output=True, text=True, timeout=timeout, env=self.env(), check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{shlex.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def sbatch(self, *options: str, script: str | None = None, wrap: str | None = None) -> int:
        """Submit a batch job (a script's text, or a --wrap command) and return its job id."""
        if (script is None) == (wrap is None):
            raise ValueError("pass exactly one of script= or wrap=")
        args = ["sbatch", "--parsable", *options]
        if wrap is not None:
            args += ["--wrap", wrap]
        out = self.run(args, input=script).stdout.strip()
        # --parsable prints "jobid" or "jobid;cluster".
        return int(out.split(";", 1)[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job -o`` as a dict. Values containing spaces are cut at the first space."""
        line = self.run(["scontrol", "show", "job", "-o", str(job_id)]).stdout.strip()
        fields: dict[str, str] = {}
        for token in line.split():
            if "=" in token:
                key, value = token.split("=", 1)
                fields.setdefault(key, value)
        return fields

    def wait_for_job(
        self, job_id: int, states: Iterable[str] = FINISHED_STATES, *, timeout: float = 60
    ) -> dict[str, str]:
        """Poll until the job reaches one of ``states``; fail with its record and the logs otherwise."""
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        info = self.job(job_id)
        while info.get("JobState") not in wanted:
            if time.monotonic() > deadline:
                pytest.fail(
                    f"job {job_id} not in {sorted(wanted)} after {timeout:.0f} s: "
                    f"JobState={info.get('JobState')} Reason={info.get('Reason')}\n{self.log_tail()}"
                )
            time.sleep(0.25)
            info = self.job(job_id)
        return info

    def wait_for_text(self, path: Path, text: str, *, timeout: float = 60) -> str:
        """Poll until ``path`` exists and contains ``text``; return the file's content."""
        deadline = time.monotonic() + timeout
        while True:
            content = path.read_text() if path.exists() else ""
            if text in content:
                return content
            if time.monotonic() > deadline:
                pytest.fail(f"{path} did not contain {text!r} after {timeout:.0f} s; it holds:\n{content}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 15) -> str:
        """The end of every daemon log, for failure messages."""
        parts = []
        for log in sorted(self.log_dir.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"--- {log}\n" + "\n".join(tail))
        return "\n".join(parts)


def _stop(base_dir: Path, *, purge: bool) -> subprocess.CompletedProcess[str]:
    args = ["bash", str(DEV_CLUSTER_DIR / "stop.sh")] + (["--purge"] if purge else [])
    return subprocess.run(
        args,
        env=_clean_env(SLURM_DEV_DIR=str(base_dir)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=STOP_TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="session")
def slurm_cluster(request: pytest.FixtureRequest) -> Iterator[SlurmCluster]:
    # Under /tmp rather than pytest's basetemp: MUNGE's unix socket path must stay short (108 bytes).
    base_dir = Path(tempfile.mkdtemp(prefix="trainer-slurm-test-", dir="/tmp"))
    proc = subprocess.run(
        ["bash", str(DEV_CLUSTER_DIR / "start.sh")],
        env=_clean_env(SLURM_DEV_DIR=str(base_dir)),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=START_TIMEOUT_S,
        check=False,
    )
    exports = _parse_exports(proc.stdout)
    if proc.returncode != 0 or "SLURM_CONF" not in exports:
        # A half-started cluster must not outlive the session.
        _stop(base_dir, purge=False)
        message = f"Slurm dev cluster did not start (start.sh exit {proc.returncode}): {_last_line(proc.stderr)}"
        has_logs = any((base_dir / "log").glob("*.log"))
        if not has_logs:
            shutil.rmtree(base_dir, ignore_errors=True)
        if os.environ.get("CI") == "true":
            where = f"\ndaemon logs kept in {base_dir / 'log'}" if has_logs else ""
            pytest.fail(f"{message}\nfull start.sh output:\n{proc.stderr}{where}", pytrace=False)
        shutil.rmtree(base_dir, ignore_errors=True)
        pytest.skip(message)

    conf = Path(exports["SLURM_CONF"])
    nodes = [line.split("=", 1)[1].split()[0] for line in conf.read_text().splitlines() if line.startswith("NodeName=")]
    cluster = SlurmCluster(base_dir=base_dir, conf=conf, nodes=nodes)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    try:
        yield cluster
    finally:
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
        # Keep the logs when something failed, so the failure can be read afterwards.
        keep = request.session.testsfailed > 0
        stopped = _stop(base_dir, purge=not keep)
        if stopped.returncode != 0:
            raise RuntimeError(f"stop.sh failed (exit {stopped.returncode}); daemons may be left:\n{stopped.stderr}")
        if keep:
            print(f"\nSlurm dev cluster logs kept in {base_dir / 'log'}")
