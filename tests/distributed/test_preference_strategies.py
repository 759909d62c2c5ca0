"""DPO on two gloo ranks under every sharding family gives single-process losses: pairs stay whole across ranks,
the reference log-probs are computed in lockstep (sharded forwards) and summed, the loss is a mean over the global
batch's pairs. Under ZeRO-3 the run then resumes exactly from a checkpoint on both ranks."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import read_metrics, run_cli, train_losses

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

COMMON = ("experiment=demo-dpo", "train.max_steps=3", "train.micro_batch_size=2", "train.global_batch_size=8",
          "eval.max_batches=0", "logger.progress=false", "logger.plot=false", "train.precision=fp32",
          "peft.dropout=0", "optim.lr=2e-4", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0")


def _train(run_dir: Path, *overrides: str, ranks: int) -> dict[int, float]:
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, f"launcher.nproc_per_node={ranks}", *overrides,
                     timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return train_losses(run_dir)


def _resumes_exactly(run_dir: Path, losses: dict[int, float], *overrides: str) -> None:
    """The run started again from its step-2 checkpoint (final/ gone, as if it had died in step 3) trains step 3
    again to the loss it had, against the reference log-probs it recorded, not recomputed."""
    reference = (run_dir / "reference_logps.safetensors").read_bytes()
    shutil.rmtree(run_dir / "final")
    # an earlier start killed while it rewrote the reference file left its temporary beside it
    stale = run_dir / "reference_logps.safetensors.tmp.4242"
    stale.write_bytes(reference[:100])
    result = run_cli("train", f"run.dir={run_dir}", *COMMON, "launcher.nproc_per_node=2", *overrides, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert "resumed from" in result.stderr and "step-000002" in result.stderr
    assert "reference log-probs of" not in result.stderr
    assert (run_dir / "reference_logps.safetensors").read_bytes() == reference
    assert not stale.exists() and "reference_logps.safetensors.tmp.4242" in result.stderr
    assert train_losses(run_dir)[3] == pytest.approx(losses[3], rel=1e-5)


@pytest.fixture(scope="module")
def single(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("single") / "run"
    _train(run_dir, "strategy=single", ranks=1)
    return run_dir


# `make test` runs ZeRO-3 (sharded forwards in lockstep for the reference pass); `make test-all` ddp and fsdp too.
@pytest.mark.parametrize("strategy", [pytest.param("ddp", marks=pytest.mark.extended),
                                      pytest.param("fsdp", marks=pytest.mark.extended), "zero3"])
def test_dpo_on_two_ranks_matches_single_process(strategy, single, tmp_path):
    losses = _train(tmp_path / "run", f"strategy={strategy}", ranks=2)
    expected = train_losses(single)
    assert sorted(losses) == [1, 2, 3]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-3), f"step {step}"
    if strategy == "zero3":
        _resumes_exactly(tmp_path / "run", losses, f"strategy={strategy}")
    # The eval's preference metrics are reduced over the ranks' shares of the validation pairs.
    evals = [r for r in read_metrics(tmp_path / "run") if "eval_logps_chosen" in r]
    expected_evals = [r for r in read_metrics(single) if "eval_logps_chosen" in r]
    assert evals[-1]["eval_logps_chosen"] == pytest.approx(expected_evals[-1]["eval_logps_chosen"], rel=1e-3)
    assert (tmp_path / "run" / "reference_logps.safetensors").read_bytes() != b""


def test_kto_on_two_ranks_matches_single_process_with_the_kl_estimate_over_both_ranks(tmp_path):
    """KTO's KL estimate is a mean over one micro step's answers on all ranks (as TRL gathers it): 2 ranks x micro 2
    see the same 4 answers per micro step as one process with micro 4, so the losses agree."""
    kto = ("objective.name=kto",)
    _train(tmp_path / "single", *kto, "strategy=single", "train.micro_batch_size=4", ranks=1)
    losses = _train(tmp_path / "ddp", *kto, "strategy=ddp", ranks=2)
    expected = train_losses(tmp_path / "single")
    assert sorted(losses) == [1, 2, 3]
    for step, loss in expected.items():
        assert losses[step] == pytest.approx(loss, rel=1e-4), f"step {step}"
    kl = [r["kl"] for r in read_metrics(tmp_path / "ddp") if "kl" in r]
    expected_kl = [r["kl"] for r in read_metrics(tmp_path / "single") if "kl" in r]
    assert kl[-1] > 0 and kl == pytest.approx(expected_kl, rel=1e-3, abs=1e-6)
