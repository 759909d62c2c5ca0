"""Crash safety through the real CLI (one process, so each run is cheap): SIGKILL at random points while
checkpointing every step, damaged checkpoints, asynchronous and time-based saves, and the non-finite policy."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, read_summary, run_cli, train_losses

COMMON = ("train.micro_batch_size=2", "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0",
          "logger.progress=false", "logger.plot=false", "peft=none", "strategy=single")
ENV = {"OMP_NUM_THREADS": "1"}  # one thread: several times faster than two on a shared 2-core box


def _train(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, *overrides, env=ENV, timeout=600)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def _records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, tolerating a line that a SIGKILL cut short."""
    path = run_dir / "metrics.jsonl"
    records = []
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            records.append(json.loads(line))
        except ValueError:
            pass
    return records


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def _files(directory: Path) -> dict[str, tuple[int, int]]:
    """Every file under `directory`: relative path -> (size, crc32)."""
    return {str(p.relative_to(directory)): (p.stat().st_size, zlib.crc32(p.read_bytes()))
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------- SIGKILL
def test_sigkill_at_random_points_while_checkpointing_every_step_always_resumes_to_the_same_result(tmp_path):
    """Kill the run 6 times at random moments (inside steps, DCP writes, checksums, commits and pruning alike);
    each relaunch resumes from a committed checkpoint, and the run ends exactly where an uninterrupted one does."""
    overrides = ("train.max_steps=12", "checkpoint.every_n_steps=1", "checkpoint.keep_last=2")
    reference = tmp_path / "reference"
    _train(reference, *overrides)
    expected = train_losses(reference)

    from trainer.checkpoint import find_resumable, list_checkpoints

    run_dir, rng, kills, committed_once = tmp_path / "killed", random.Random(5), 0, False
    args = [sys.executable, "-m", "trainer.cli", "train", f"run.dir={run_dir}", *COMMON, *overrides]
    env = {**os.environ, "WANDB_MODE": "disabled", **ENV}
    for attempt in range(6):
        log = tmp_path / f"attempt-{attempt}.log"
        seen = len(_records(run_dir))
        job = subprocess.Popen(args, cwd=REPO, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 300
        # Wait for one more step than before (so every attempt makes progress), then kill at a random moment.
        while job.poll() is None and time.monotonic() < deadline and len(_records(run_dir)) <= seen + (seen == 0):
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if job.poll() is None:
            job.send_signal(signal.SIGKILL)
            kills += 1
        job.wait(timeout=60)
        if committed_once:
            assert "resumed from" in log.read_text(), log.read_text()[-2000:]
        # Whatever the kill interrupted, once a checkpoint has committed there is always one to resume from.
        resumable = find_resumable(str(run_dir), warn=lambda message: None)
        assert resumable is not None or not committed_once, list_checkpoints(str(run_dir))
        committed_once = committed_once or resumable is not None
    assert kills >= 4, "the run finished too soon for the kills to mean anything"
    logs = "".join((tmp_path / f"attempt-{i}.log").read_text() for i in range(6))
    print(f"{kills} kills; {logs.count('skipping checkpoint')} uncommitted/damaged checkpoints skipped on resume")
    final = _train(run_dir, *overrides)
    assert "resumed from" in final.stderr
    losses = {r["step"]: r["loss"] for r in _records(run_dir) if "loss" in r}  # a step done twice: the later wins
    assert losses == expected
    assert read_summary(run_dir)["train_loss_last"] == read_summary(reference)["train_loss_last"]
    assert len(_committed(run_dir)) == 2  # keep_last held through all the crashes (debris pruned too)


# ----------------------------------------------------------------------------------- damaged checkpoints
def test_damaged_newest_checkpoints_are_skipped_with_a_warning_and_resume_is_exact(tmp_path):
    """Time-based (every_n_minutes) asynchronous saves; then a byte flipped in the newest checkpoint (same size:
    only the crc32 notices) and a truncated shard in the one before: resume falls back to the third newest."""
    overrides = ("train.max_steps=6", "checkpoint.every_n_steps=0", "checkpoint.every_n_minutes=0.0005",
                 "checkpoint.async_save=true", "checkpoint.keep_last=0")
    run_dir = tmp_path / "run"
    _train(run_dir, *overrides)
    expected = train_losses(run_dir)
    assert _committed(run_dir) == [f"step-{s:06d}" for s in range(1, 7)]  # each step outlasts 0.03 s
    state = json.loads((run_dir / "checkpoints" / "step-000006" / "trainer_state.json").read_text())
    assert state["world_size"] == 1 and state["sampler"]["position"] == 48 and state["grad_scaler"] is None

    flipped = run_dir / "checkpoints" / "step-000006" / "state" / "__0_0.distcp"
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    truncated = run_dir / "checkpoints" / "step-000005" / "state" / "__0_0.distcp"
    with open(truncated, "r+b") as fh:
        fh.truncate(truncated.stat().st_size // 2)

    damaged = {name: _files(run_dir / "checkpoints" / name) for name in ("step-000005", "step-000006")}

    result = _train(run_dir, *overrides)
    assert "skipping checkpoint" in result.stderr and "step-000006: state/__0_0.distcp fails its crc32" in result.stderr
    assert "step-000005: state/__0_0.distcp has" in result.stderr and "truncated" in result.stderr
    assert "resumed from" in result.stderr and "step-000004 at step 4" in result.stderr
    resumed = train_losses(run_dir)
    assert resumed == expected  # steps 5 and 6 again, identical
    # The damaged checkpoints were not superseded by older ones: set aside whole, byte for byte, never deleted
    # (and the new steps 5 and 6 took their places beside the untouched 1-4).
    aside = run_dir / "checkpoints-set-aside"
    assert sorted(p.name for p in aside.iterdir()) == sorted(damaged), list(aside.iterdir())
    for name, files in damaged.items():
        assert _files(aside / name) == files, name
        assert f"set {run_dir / 'checkpoints' / name} aside as {aside / name}" in result.stderr, result.stderr[-3000:]
    assert _committed(run_dir) == [f"step-{s:06d}" for s in range(1, 7)]


def test_resume_from_an_uncommitted_checkpoint_path_is_a_one_line_error(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "train.max_steps=2", "checkpoint.every_n_steps=2")
    checkpoint = run_dir / "checkpoints" / "step-000002"
    (checkpoint / "COMMITTED").unlink()
    result = run_cli("train", f"run.dir={tmp_path / 'other'}", *COMMON, "train.max_steps=2", f"resume={checkpoint}",
                     env=ENV, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: resume=") and "not committed" in last, last


# --------------------------------------------------------------------------------------------- non-finite
def test_nonfinite_stop_exits_3_and_keeps_the_last_committed_checkpoint(tmp_path):
    """lr=1e30: step 1's Adam update moves every weight by ~1e30, so step 2's activations overflow fp32."""
    run_dir = tmp_path / "run"
    result = _train(run_dir, "train.max_steps=4", "checkpoint.every_n_steps=1", "optim.lr=1e30",
                    "train.nonfinite=stop", expect=3)
    assert "step 2: non-finite loss: stopping" in result.stderr
    summary = read_summary(run_dir)
    assert summary["status"] == "stopped_nonfinite" and summary["steps"] == 2 and summary["final_dir"] is None
    assert _committed(run_dir) == ["step-000001"]  # nothing of the bad step was saved
    from trainer.checkpoint import verify_checkpoint

    assert verify_checkpoint(str(run_dir / "checkpoints" / "step-000001")) is None
    record = [r for r in read_metrics(run_dir) if r["step"] == 2][-1]
    assert record["nonfinite"] == "loss" and record["loss"] != record["loss"]  # NaN, logged although stopping


def test_nonfinite_skip_counts_logs_and_never_updates_the_weights(tmp_path):
    import torch

    from trainer.weights import iter_safetensors

    run_dir = tmp_path / "run"
    result = _train(run_dir, "train.max_steps=4", "checkpoint.every_n_steps=1", "checkpoint.keep_last=0",
                    "optim.lr=1e30", "train.nonfinite=skip")
    assert result.stderr.count("step skipped without an update") == 3
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["skipped_steps"] == 3
    assert [r["nonfinite"] for r in read_metrics(run_dir) if "nonfinite" in r] == ["loss"] * 3
    # The weights after step 4 are step 1's: the three skipped steps changed nothing (and no NaN got in).
    out = tmp_path / "step1"
    exported = run_cli("export", str(run_dir / "checkpoints" / "step-000001"), "--to", "hf", "--out", str(out),
                       env=ENV, timeout=600)
    assert exported.returncode == 0, exported.stderr[-2000:]
    final = dict(iter_safetensors(str(run_dir / "final")))
    for name, tensor in iter_safetensors(str(out)):
        assert torch.equal(tensor, final[name]), name
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("value", ["maybe"])
def test_nonfinite_policy_is_validated_at_compose_time(value, tmp_path):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", f"train.nonfinite={value}", timeout=120)
    assert result.returncode == 2 and "train.nonfinite" in result.stderr.strip().splitlines()[-1], result.stderr


# ------------------------------------------------------------------------------------------------- safety
class _RunsCode:
    """A pickle payload that would call os.getcwd on load (harmless, but any call means arbitrary code)."""

    def __reduce__(self):
        return (os.getcwd, ())


def test_checkpoint_readers_refuse_pickles_that_would_run_code(tmp_path):
    import pickle

    import torch

    from trainer.errors import UserError
    from trainer.export.checkpoint_reader import SafeFileSystemReader, check_deepspeed_files

    dcp_dir = tmp_path / "dcp"
    dcp_dir.mkdir()
    (dcp_dir / ".metadata").write_bytes(pickle.dumps(_RunsCode()))
    with pytest.raises(UserError, match="refusing to unpickle posix.getcwd"):
        SafeFileSystemReader(str(dcp_dir)).read_metadata()

    ds_dir = tmp_path / "deepspeed"
    ds_dir.mkdir()
    torch.save({"module": {}, "payload": _RunsCode()}, ds_dir / "mp_rank_00_model_states.pt")
    with pytest.raises(UserError, match="references posix.getcwd"):
        check_deepspeed_files(str(ds_dir))


def test_a_start_removes_only_the_half_written_files_an_earlier_killed_start_left(tmp_path):
    from trainer.checkpoint import remove_stale_temporaries

    run = tmp_path / "run"
    (run / "checkpoints" / "step-000002").mkdir(parents=True)
    leftovers = ["lineage.json.tmp.31337", "reference_logps.safetensors.tmp.7", "weight_anchor.safetensors.tmp.12"]
    kept = ["config.yaml", "metrics.jsonl", "notes.tmp", "my.tmp.backup", "checkpoints/step-000002/state.json.tmp.9"]
    for name in leftovers + kept:
        (run / name).write_text("x")
    assert remove_stale_temporaries(str(run)) == sorted(leftovers)
    assert all((run / name).exists() for name in kept) and not any((run / name).exists() for name in leftovers)
    assert remove_stale_temporaries(str(tmp_path / "missing")) == []
