"""Helpers for tests that signal a running `trainer train`: start it, wait for a moment, find its processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import REPO


def start(args: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    """`trainer ARGS` with output to a file: an unread pipe would fill up and block the workers."""
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})})


def wait_for_step(run_dir: Path, step: int, job: subprocess.Popen, timeout: float = 600) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if metrics.exists() and f'"step": {step},' in metrics.read_text():
            return
        time.sleep(0.1)
    raise AssertionError(f"step {step} never came (exit code {job.poll()})")


def processes_of(run_dir: Path) -> dict[int, str]:
    """Every live process whose command line names the run dir (launcher, torchrun agent, workers), from /proc."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if str(run_dir).encode() in cmdline and state != "Z":
            found[int(entry)] = cmdline.replace(b"\0", b" ").decode(errors="replace")
    return found


def agent_pid(run_dir: Path, timeout: float = 300) -> int:
    """The torchrun agent's pid (launch/agent.py), once it exists."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid, cmdline in processes_of(run_dir).items():
            if "launch.agent" in cmdline:
                return pid
        time.sleep(0.1)
    raise AssertionError("no torchrun agent")


def assert_none_left(run_dir: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while processes_of(run_dir) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not processes_of(run_dir), processes_of(run_dir)
