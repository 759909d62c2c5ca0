"""Shared test helpers: run the real `trainer` CLI in a subprocess and read its run dir."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# Tokenised-data cache for the tests' runs: shared within one test session, never the user's ~/.cache.
os.environ.setdefault("TRAINER_CACHE_DIR", tempfile.mkdtemp(prefix="trainer-test-cache-"))
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def run_cli(*args: str, timeout: float = 600, env: dict | None = None,
            cwd: str | None = None) -> subprocess.CompletedProcess:
    """`trainer ARGS` in a fresh Python process, exactly as a user runs it."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "disabled"),
                **(env or {})}
    return subprocess.run([sys.executable, "-m", "trainer.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=cwd or str(REPO))


def compose_config(*overrides: str):
    """The validated `Config` that `trainer train OVERRIDES` would freeze (no run started)."""
    from launch.compose import compose_train_config
    from trainer.config.validate import to_config

    return to_config(compose_train_config(list(overrides)))


def read_metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.jsonl") as fh:
        return [json.loads(line) for line in fh]


def train_losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user error: exit code 2, one line on stderr naming what is wrong, no traceback."""
    assert result.returncode == 2, f"exit {result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert "Traceback" not in result.stderr, result.stderr
    assert len(lines) == 1, f"expected one line, got:\n{result.stderr}"
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


def worker_pids(run_dir: Path) -> list[int]:
    """PIDs of this run's trainer.worker processes (not torchrun's agent), rank order, from /proc."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        ours = b"trainer.worker" in cmdline and str(run_dir).encode() in cmdline
        if ours and b"torch.distributed.run" not in cmdline and b"launch.agent" not in cmdline:
            rank = next((int(v[5:]) for v in environ if v.startswith(b"RANK=")), -1)
            found.append((rank, int(entry)))
    return [pid for _, pid in sorted(found)]


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's own hook, which reads the groups (this conftest loads first)
def pytest_collection_modifyitems(config, items):
    """`make test` runs two pytest-xdist workers (most of a test's time is a subprocess importing torch or waiting
    on ranks, which the other worker fills). Tests that share something costly stay together on one worker: the
    Slurm tests (one dev cluster, a session fixture), and the tests of a module that share a module-scoped fixture
    (reference runs, built replicas), which would otherwise be built once per worker. Every other test takes a free
    port and its own tmp dir, and may run anywhere."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm-dev-cluster"))
            continue
        fixtures = getattr(item, "_fixtureinfo", None)
        definitions = fixtures.name2fixturedefs.values() if fixtures is not None else []
        # a session fixture of our own (a conftest's, not pytest's tmp_path_factory) is shared by several modules
        shared = sorted(d.argname for defs in definitions for d in defs if d.scope == "session" and d.baseid)
        if shared:
            item.add_marker(pytest.mark.xdist_group(f"fixture-{shared[0]}"))
        elif any(d.scope == "module" for defs in definitions for d in defs):
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


def pytest_runtest_logreport(report):
    """With TRAINER_TEST_TIMINGS=FILE, one line per test as it finishes: seconds, outcome, id (the controller's view
    under xdist). `--durations` prints only at the end of a run; this shows where a long run's time goes meanwhile."""
    path = os.environ.get("TRAINER_TEST_TIMINGS")
    if not path or os.environ.get("PYTEST_XDIST_WORKER"):  # workers report to the controller, which writes
        return
    if report.when == "call" or report.failed or report.duration > 1:  # module fixtures' cost shows in "setup"
        with open(path, "a") as fh:
            fh.write(f"{report.duration:8.1f} {report.outcome:7s} {report.when:8s} {report.nodeid}\n")


# A few quick steps of the embedded default, shared by the end-to-end tests.
QUICK = ("train.max_steps=6", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=2",
         "eval.generate_samples=4", "eval.max_new_tokens=8", "logger.progress=false", "logger.plot=true")


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
