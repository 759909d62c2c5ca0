"""Exact resume through the real CLI: on every strategy, after preemption, and on another world size.

Each (strategy, PEFT) pair trains one uninterrupted 8-step reference run (module-scoped, shared by every test
that needs it) that checkpoints at steps 4 and 8. A second process resumes from its step-4 checkpoint and must
reproduce steps 5-8 bit for bit (fp32). The checkpoint a fresh process loads is the same one a crash right
after step 4's commit would leave; the realistic interruptions (SIGUSR1 to one rank, requeue, relaunch; SIGKILL
mid-save) are tested below and in tests/integration/test_checkpoint.py. The LoRA runs train on 32 unpacked
samples: 4 global batches of 8 per epoch, so their resume at step 4 lands exactly on an epoch boundary (and
LoRA's dropout keeps the restored per-rank RNG streams honest).

Time: 31 CLI runs and 3 exports, about 11 minutes on a shared 2-core CPU box (2-rank DeepSpeed runs are the
slowest). Drop the LoRA half of CASES (ddp/zero3 share their code paths with the other strategies) if that is too
slow for a CI tier.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, read_metrics, read_summary, run_cli, train_losses, worker_pids
from tests.signals import wait_for_step

pytestmark = pytest.mark.distributed

COMMON = ("train.max_steps=8", "train.micro_batch_size=2", "train.global_batch_size=8", "eval.max_batches=1",
          "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "train.precision=fp32",
          "checkpoint.every_n_steps=4", "checkpoint.keep_last=0")
EPOCH_OF_4_STEPS = ("data.packing=false", "data.max_samples=32")  # 32 rows: 4 global batches of 8 per epoch
ENV = {"OMP_NUM_THREADS": "1"}  # one thread per process: on a shared 2-core box this is several times faster


def _overrides(strategy: str, peft: str, ranks: int | None = None) -> list[str]:
    ranks = ranks if ranks is not None else (1 if strategy == "single" else 2)
    extra = list(EPOCH_OF_4_STEPS) if peft == "lora" else []
    return [f"strategy={strategy}", f"peft={peft}", f"launcher.nproc_per_node={ranks}", *extra]


def _train(run_dir: Path, *overrides: str, expect: int = 0) -> subprocess.CompletedProcess:
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, *overrides, env=ENV, timeout=900)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-4000:]
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _one_rank_with_a_process_group() -> list[str]:
    """One worker through the deepspeed launcher (also exercising that launcher), on a port of its own."""
    return ["launcher.nproc_per_node=1", "launcher.backend=deepspeed",
            f"launcher.rdzv_endpoint=127.0.0.1:{_free_port()}"]


def _label_tokens(run_dir: Path) -> dict[int, int]:
    """Label tokens per step: a fingerprint of which rows each step trained on."""
    return {r["step"]: r["label_tokens"] for r in read_metrics(run_dir) if "label_tokens" in r}


class References:
    """Uninterrupted runs, trained once per module and shared."""

    def __init__(self, root: Path):
        self.root = root
        self.runs: dict[tuple[str, str], Path] = {}

    def __call__(self, strategy: str, peft: str) -> Path:
        key = (strategy, peft)
        if key not in self.runs:
            run_dir = self.root / f"{strategy}-{peft}"
            _train(run_dir, *_overrides(strategy, peft))
            self.runs[key] = run_dir
        return self.runs[key]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> References:
    return References(tmp_path_factory.mktemp("reference"))


CASES = [(strategy, peft) for peft in ("none", "lora") for strategy in ("single", "ddp", "fsdp", "zero2", "zero3")]
CASES += [("zero1", "lora"), ("zero3_offload", "lora")]  # every strategy docs/distributed.md lists resumes exactly
# `make test` resumes one case per torch engine here (DCP: single, FSDP2; DDP's checkpoint is single's, resumed in the
# preemption test below); DeepSpeed's checkpoints resume in `make test` on another world size below (ZeRO-3 from 2
# ranks to 1, ZeRO-2 from 1 to 2), which is this test and more. `make test-all` runs the whole matrix, ZeRO-3 with
# CPU offload included (about 4 minutes on 2 cores: its CPU Adam steps are slow).
EXTENDED_CASES = {("single", "none"), ("ddp", "lora"), ("fsdp", "lora"), ("zero2", "none"), ("zero3", "lora"),
                  ("ddp", "none"), ("zero1", "lora"), ("zero2", "lora"), ("zero3", "none"), ("zero3_offload", "lora")}
CASES = [pytest.param(*case, marks=[pytest.mark.extended] if case in EXTENDED_CASES else []) for case in CASES]


@pytest.mark.parametrize("strategy,peft", CASES)
def test_resume_after_step_4_reproduces_steps_5_to_8_exactly(strategy, peft, reference, tmp_path):
    ref = reference(strategy, peft)
    expected = train_losses(ref)
    assert sorted(expected) == list(range(1, 9))
    checkpoint = ref / "checkpoints" / "step-000004"
    result = _train(tmp_path / "resumed", *_overrides(strategy, peft), f"resume={checkpoint}")
    assert f"resumed from {checkpoint} at step 4" in result.stderr
    resumed = train_losses(tmp_path / "resumed")
    assert sorted(resumed) == [5, 6, 7, 8]
    for step in (5, 6, 7, 8):
        assert resumed[step] == expected[step], f"step {step}: {resumed[step]!r} != {expected[step]!r}"
    if peft == "lora":  # the resume crossed into the second epoch exactly where the reference did
        assert [r["epoch"] for r in read_metrics(tmp_path / "resumed") if "epoch" in r] == [1, 1, 1, 1]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert saved["world_size"] == (1 if strategy == "single" else 2)
    assert saved["format"] == ("deepspeed" if strategy.startswith("zero") else "dcp")
    assert sorted(p.name for p in checkpoint.glob("rng-rank*.json")) == [
        f"rng-rank{r:05d}.json" for r in range(saved["world_size"])]


# ----------------------------------------------------------------------------------------------- preemption
def _start(args: list[str], log: Path) -> subprocess.Popen:
    """`trainer ARGS` with output to a file: an unread pipe would fill up and block the workers."""
    return subprocess.Popen([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "WANDB_MODE": "disabled", **ENV})


def test_sigusr1_to_one_rank_checkpoints_both_exits_85_and_relaunch_matches(reference, tmp_path):
    """Preemption on rank 1 only (plus a second signal to rank 0 during the stop): both ranks agree on one step,
    save it (asynchronously, with a time-based cadence running too), exit with the requeue code; the relaunch
    continues to the uninterrupted run's losses."""
    expected = train_losses(reference("ddp", "none"))
    run_dir = tmp_path / "preempted"
    args = ["train", f"run.dir={run_dir}", *COMMON, *_overrides("ddp", "none"), "checkpoint.async_save=true",
            "checkpoint.every_n_minutes=0.002"]
    job = _start(args, tmp_path / "first.log")
    wait_for_step(run_dir, 2, job)
    pids = worker_pids(run_dir)
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGUSR1)
    time.sleep(0.05)
    os.kill(pids[0], signal.SIGTERM)  # a second signal, on the other rank, while they stop: absorbed, not fatal
    job.wait(timeout=600)
    output = (tmp_path / "first.log").read_text()
    assert job.returncode == 85, output[-3000:]
    summary = read_summary(run_dir)
    stopped = summary["steps"]
    assert summary["status"] == "preempted" and 2 <= stopped < 8, summary
    # Rank 0 prints the log; it names the signal that reached rank 1 (the ranks agree on the reason, too).
    assert f"SIGUSR1: stopping at step {stopped}" in output, output[-3000:]
    checkpoint = run_dir / "checkpoints" / f"step-{stopped:06d}"
    assert (checkpoint / "COMMITTED").is_file()
    assert {p.name for p in checkpoint.glob("rng-rank*.json")} == {"rng-rank00000.json", "rng-rank00001.json"}
    records = [json.loads(p.read_text()) for p in sorted((run_dir / ".workers").glob("rank-*.json"))]
    assert [(r["rank"], r["exit_code"]) for r in records] == [(0, 85), (1, 85)], records

    relaunch = run_cli(*args, env=ENV, timeout=900)
    assert relaunch.returncode == 0, relaunch.stderr[-4000:]
    assert f"resumed from {checkpoint} at step {stopped}" in relaunch.stderr
    losses = train_losses(run_dir)  # later records of a step (the relaunch's) win
    for step in range(1, 9):
        assert losses[step] == expected[step], f"step {step}"
    assert read_summary(run_dir)["status"] == "completed"


# ---------------------------------------------------------------------------------------- other world sizes
def _assert_same_steps_5_to_8(run_dir: Path, ref: Path) -> None:
    losses, expected = train_losses(run_dir), train_losses(ref)
    assert sorted(losses) == [5, 6, 7, 8]
    assert {s: _label_tokens(ref)[s] for s in losses} == _label_tokens(run_dir)  # same rows per step
    for step in losses:  # one rank sums in another order than two: equal to rounding, not bit for bit
        assert losses[step] == pytest.approx(expected[step], rel=1e-4), f"step {step}"


@pytest.mark.parametrize("strategy", ["fsdp", pytest.param("zero2", marks=pytest.mark.extended), "zero3"])
def test_checkpoint_from_2_ranks_resumes_on_1_rank_with_the_same_data_order(strategy, reference, tmp_path):
    """DCP reshards FSDP2 checkpoints itself; ZeRO partitions go through DeepSpeed's universal checkpoint."""
    ref = reference(strategy, "none")
    run_dir = tmp_path / "one-rank"
    result = _train(run_dir, f"strategy={strategy}", "peft=none", *_one_rank_with_a_process_group(),
                    f"resume={ref / 'checkpoints' / 'step-000004'}")
    assert "resumed from" in result.stderr
    _assert_same_steps_5_to_8(run_dir, ref)
    assert not (run_dir / "resharded").exists()  # the universal conversion is scratch: removed once loaded


@pytest.mark.extended  # `make test` reshards zero3 (full) and fsdp from 2 ranks to 1, zero2 from 1 to 2
def test_zero3_lora_checkpoint_from_2_ranks_resumes_on_1_rank(tmp_path):
    """Frozen base weights are not in a ZeRO checkpoint (only the adapters): the universal conversion must cope.
    Dropout off: its random streams are per rank, so they cannot continue on another world size."""
    lora = ["strategy=zero3", "peft=lora", "peft.dropout=0", *EPOCH_OF_4_STEPS]
    ref = tmp_path / "two-ranks"
    _train(ref, *lora, "launcher.nproc_per_node=2")
    _train(tmp_path / "one-rank", *lora, *_one_rank_with_a_process_group(),
           f"resume={ref / 'checkpoints' / 'step-000004'}")
    _assert_same_steps_5_to_8(tmp_path / "one-rank", ref)


def test_zero2_checkpoint_from_1_rank_resumes_on_2_ranks(tmp_path):
    ref = tmp_path / "one-rank"
    _train(ref, "strategy=zero2", "peft=none", *_one_rank_with_a_process_group())
    _train(tmp_path / "two-ranks", "strategy=zero2", "peft=none", "launcher.nproc_per_node=2",
           f"resume={ref / 'checkpoints' / 'step-000004'}")
    _assert_same_steps_5_to_8(tmp_path / "two-ranks", ref)


# ------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("strategy,peft", [("fsdp", "none"), ("zero3", "none"), ("zero2", "lora")])
def test_export_of_a_two_rank_checkpoint_equals_the_runs_final_model(strategy, peft, reference, tmp_path):
    """Sharded DCP (FSDP2) and ZeRO partitions reassemble into exactly the weights the run saved in final/."""
    import torch
    from safetensors.torch import load_file

    from trainer.weights import iter_safetensors

    ref = reference(strategy, peft)
    out = tmp_path / "export"
    result = run_cli("export", str(ref / "checkpoints" / "step-000008"), "--to", "adapter" if peft == "lora" else "hf",
                     "--out", str(out), env=ENV, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    if peft == "lora":
        exported, final = (load_file(d / "adapter_model.safetensors") for d in (out, ref / "final"))
    else:
        exported, final = dict(iter_safetensors(str(out))), dict(iter_safetensors(str(ref / "final")))
    assert exported.keys() == final.keys()
    for name in final:
        assert torch.equal(exported[name], final[name]), name
