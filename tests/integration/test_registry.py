"""`trainer register` / `trainer registry` on MLflow's embedded store, read back with MLflow's own client.

A short demo run is registered with its lineage; the version, its tags, params, metrics and artifacts are read with
`mlflow.MlflowClient` (not our code); an alias is set and followed; the gate refuses a run below its threshold
without creating anything; registry.auto registers a run at its end.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, read_summary, run_cli

mlflow = pytest.importorskip("mlflow")

SHORT = ("train.max_steps=6", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
         "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "optim.lr=5e-3", "peft.r=8")
TINY = REPO / "trainer" / "assets" / "tiny-llama"
TRAIN_FILE = REPO / "trainer" / "assets" / "demo-facts" / "train.jsonl"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _client(store: Path):
    uri = f"sqlite:///{store / 'mlflow.db'}"
    return mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("registry") / "facts-run"
    result = run_cli("train", f"run.dir={run_dir}", *SHORT)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return run_dir


@pytest.mark.slow
def test_training_records_lineage_with_content_hashes(demo_run):
    lineage = json.loads((demo_run / "lineage.json").read_text())
    assert lineage["base_model"]["config_sha256"] == _sha256(TINY / "config.json")
    files = lineage["data"]["data.path"]["files"]
    assert files == {str(TRAIN_FILE): _sha256(TRAIN_FILE)}
    assert len(lineage["data_fingerprint"]) >= 16
    assert lineage["code"]["version"] and len(lineage["starts"]) == 1


@pytest.mark.slow
def test_register_reads_back_with_mlflow_client_and_alias(demo_run, tmp_path):
    store = tmp_path / "store"
    result = run_cli("register", str(demo_run), "--name", "facts", "--alias", "champion", "--tracking-uri", str(store),
                     "--require", "eval.loss<=100", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "registered facts version 1 (alias champion)" in result.stdout

    client = _client(store)
    version = client.get_model_version_by_alias("facts", "champion")
    assert str(version.version) == "1"
    tags = version.tags
    assert tags["lineage.base_model.config_sha256"] == _sha256(TINY / "config.json")
    assert tags["lineage.data.data.path.sha256"] == hashlib.sha256(_sha256(TRAIN_FILE).encode()).hexdigest()
    lineage = json.loads((demo_run / "lineage.json").read_text())
    assert tags["lineage.data_fingerprint"] == lineage["data_fingerprint"]
    assert tags["lineage.run_dir"] == str(demo_run) and tags["trainer.kind"] == "adapter"
    assert tags["lineage.code.version"] == lineage["code"]["version"]

    run = client.get_run(version.run_id)
    summary = read_summary(demo_run)
    assert run.data.metrics["eval.loss"] == pytest.approx(summary["eval_after"]["loss"])
    assert run.data.metrics["eval_before.loss"] == pytest.approx(summary["eval_before"]["loss"])
    assert run.data.params["peft.name"] == "lora" and run.data.params["optim.lr"] == "0.005"
    artifacts = {a.path for a in client.list_artifacts(version.run_id, "model")}
    assert {"model/adapter_config.json", "model/adapter_model.safetensors", "model/config.yaml"} <= artifacts
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=version.source, tracking_uri=client.tracking_uri))
    assert (local / "adapter_model.safetensors").read_bytes() == (
        demo_run / "final" / "adapter_model.safetensors").read_bytes()

    shown = run_cli("registry", "show", "facts@champion", "--tracking-uri", str(store), timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert "facts version 1 (alias champion)" in shown.stdout and tags["lineage.data_fingerprint"] in shown.stdout


@pytest.mark.slow
def test_gate_refuses_a_run_below_threshold_and_registers_nothing(demo_run, tmp_path):
    store = tmp_path / "store"
    loss = read_summary(demo_run)["eval_after"]["loss"]
    result = run_cli("register", str(demo_run), "--name", "facts", "--tracking-uri", str(store),
                     "--require", f"eval.loss<={loss / 2}", timeout=300)
    assert_one_line_error(result, "not registered", f"eval.loss<={loss / 2:g} fails")
    assert not (store / "mlflow.db").exists() or not _client(store).search_registered_models()

    ok = run_cli("register", str(demo_run), "--name", "facts", "--tracking-uri", str(store), timeout=300)
    assert ok.returncode == 0, ok.stderr[-2000:]
    refused = run_cli("registry", "promote", "facts/1", "--alias", "champion", "--tracking-uri", str(store),
                      "--require", "eval.loss<=1e-06", timeout=120)
    assert_one_line_error(refused, "does not become 'champion'", "eval.loss<=1e-06 fails")
    assert "champion" not in _client(store).get_registered_model("facts").aliases
    promoted = run_cli("registry", "promote", "facts/1", "--alias", "champion", "--tracking-uri", str(store),
                       "--require", f"eval.loss<={loss * 2}", timeout=120)
    assert promoted.returncode == 0, promoted.stderr
    assert str(_client(store).get_model_version_by_alias("facts", "champion").version) == "1"


def test_unknown_metric_bad_gate_and_unfinished_run_are_one_line(tmp_path):
    bad = run_cli("register", str(tmp_path), "--name", "x", "--require", "exact_match=>0.5", timeout=60)
    assert_one_line_error(bad, "--require 'exact_match=>0.5'", "METRIC OP NUMBER")
    not_run = run_cli("register", str(tmp_path), "--name", "x", "--tracking-uri", str(tmp_path / "s"), timeout=60)
    assert_one_line_error(not_run, "not a run dir")
    missing = run_cli("registry", "show", "nothing", "--tracking-uri", str(tmp_path / "s"), timeout=120)
    assert_one_line_error(missing, "no registered model 'nothing'")
    config = run_cli("train", 'registry.require=["eval.loss<<1"]', f"run.dir={tmp_path / 'run'}", timeout=120)
    assert_one_line_error(config, "registry.require.0")
    secret = run_cli("train", "registry.tracking_uri=https://bob:hunter2@mlflow.example/", timeout=120)
    assert_one_line_error(secret, "registry.tracking_uri", "MLFLOW_TRACKING_PASSWORD")
    assert "hunter2" not in secret.stderr
    down = run_cli("registry", "list", "--tracking-uri", "http://127.0.0.1:9/", timeout=120)
    assert_one_line_error(down, "registry:", "MLflow server is up")


@pytest.mark.slow
def test_registry_auto_registers_the_finished_run(tmp_path):
    store = tmp_path / "store"
    run_dir = tmp_path / "auto-run"
    result = run_cli("train", f"run.dir={run_dir}", *SHORT, "registry.auto=true", "registry.name=auto-facts",
                     "registry.aliases=[candidate]", f"registry.tracking_uri={store}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert "registered auto-facts version 1 (alias candidate)" in result.stdout
    version = _client(store).get_model_version_by_alias("auto-facts", "candidate")
    assert version.tags["lineage.run_dir"] == str(run_dir)


@pytest.mark.slow
def test_a_run_whose_data_moved_since_training_registers_with_its_recorded_lineage(demo_run, tmp_path):
    """Data on scratch space is often gone when a finished run is registered: the lineage training recorded names
    it; a run from before lineage.json keeps the moved path, without a hash (and says it was computed later)."""
    import shutil

    moved = tmp_path / "moved-run"
    shutil.copytree(demo_run, moved)
    config = (moved / "config.yaml").read_text()
    assert str(TRAIN_FILE) in config
    (moved / "config.yaml").write_text(config.replace(str(TRAIN_FILE), str(tmp_path / "gone" / "train.jsonl")))
    store = tmp_path / "store"
    first = run_cli("register", str(moved), "--name", "moved", "--tracking-uri", str(store), timeout=300)
    assert first.returncode == 0, first.stderr[-2000:]
    (moved / "lineage.json").unlink()
    second = run_cli("register", str(moved), "--name", "moved", "--tracking-uri", str(store), timeout=300)
    assert second.returncode == 0, second.stderr[-2000:]
    client = _client(store)
    recorded, computed = (client.get_model_version("moved", v).tags for v in ("1", "2"))
    assert recorded["lineage.data.data.path.sha256"] == hashlib.sha256(_sha256(TRAIN_FILE).encode()).hexdigest()
    assert computed["lineage.data.data.path"] == str(tmp_path / "gone" / "train.jsonl")
    assert "lineage.data.data.path.sha256" not in computed and "lineage.data_fingerprint" not in computed
    assert computed["lineage.base_model.config_sha256"] == _sha256(TINY / "config.json")
