"""A full disk is named, not met with a traceback and a partial shard: the save that cannot fit is refused before
it writes anything, and one that meets ENOSPC anyway has its partial files removed. One line naming the dir and the
free/needed bytes, exit 2, the previous checkpoint intact. About 1 minute (the tmpfs case needs root to mount)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import run_cli

COMMON = ("train.max_steps=3", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
          "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "checkpoint.every_n_steps=1",
          "checkpoint.keep_last=0")


def _assert_disk_full(result, directory: Path, *fragments: str) -> None:
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: disk full: ") and str(directory) in last, last
    for fragment in fragments:
        assert fragment in last, last


def test_a_save_that_cannot_fit_is_refused_before_writing(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, env={"TRAINER_TEST_FREE_BYTES": str(2**20),
                                                                  "OMP_NUM_THREADS": "1"})
    _assert_disk_full(result, run_dir / "checkpoints", "has too little space", "1.0 MiB free", "needs about")
    assert not list((run_dir / "checkpoints").iterdir())


@pytest.fixture
def small_tmpfs(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_enospc_during_a_save_removes_its_partial_files_and_says_so(small_tmpfs):
    """6 MiB hold the first 3.9 MiB LoRA checkpoint but not the second; the space check is told there is plenty,
    so the second save really meets ENOSPC."""
    run_dir = small_tmpfs / "run"
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, env={"TRAINER_TEST_FREE_BYTES": str(2**40),
                                                                  "OMP_NUM_THREADS": "1"})
    _assert_disk_full(result, run_dir / "checkpoints", "ran out of space while saving", "free")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000001"]
    assert (run_dir / "checkpoints" / "step-000001" / "COMMITTED").is_file()
