"""Secrets given on the command line never reach W&B's files or the lock file; a credential key the schema lacks is
refused without echoing its value. W&B in offline mode writes everything it would upload under RUN/wandb/."""

from __future__ import annotations

from tests.conftest import assert_one_line_error, run_cli

SECRET = "hf_SEKRETvalue12345"


def test_a_secret_override_is_redacted_in_everything_w_and_b_records(tmp_path):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", "experiment=demo", f"+model.arch.hf_token={SECRET}",
                     "train.max_steps=1", "train.micro_batch_size=4", "train.global_batch_size=8",
                     "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false",
                     "logger.wandb.mode=offline", env={"WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = list((run_dir / "wandb").rglob("run-*.wandb"))  # what W&B would upload: config, command line, logs
    assert len(records) == 1 and b"hf_token=***" in records[0].read_bytes(), records  # the command line, redacted
    leaking = [p for p in run_dir.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert not leaking, leaking

def test_a_credential_as_a_config_key_is_refused_without_echoing_it(tmp_path):
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", f"+logger.wandb.api_key={SECRET}")
    assert_one_line_error(result, "logger.wandb.api_key", "WANDB_API_KEY")
    assert SECRET not in result.stderr + result.stdout
