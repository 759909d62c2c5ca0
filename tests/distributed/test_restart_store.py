"""Workers that torchrun restarts meet each other, not the addresses their killed predecessors left behind."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.distributed


def test_restarted_workers_form_a_new_process_group():
    # torchrun's c10d rendezvous reuses one store across restarts; without our per-attempt prefix rank 1 of the
    # second attempt reads the dead rank 0's gloo address and fails with "Connection refused".
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "--max_restarts=1", str(REPO / "tests" / "distributed" / "restart_probe.py")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert "attempt 1 rank 0 met its peers" in output and "attempt 1 rank 1 met its peers" in output
