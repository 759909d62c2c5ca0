"""`strategy=auto` on real architectures (conf/model entries) with simulated GPUs: what it picks, what it writes
into the frozen config, and that it refuses when nothing fits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from launch.auto_strategy import AUTO_RECORD, Devices, detect_devices, resolve_auto_strategy
from tests.conftest import REPO, compose_config, read_summary, run_cli
from trainer.errors import ConfigError


def _model_dir(tmp_path: Path, entry: str) -> str:
    """A checkpoint dir holding only the entry's config.json: enough for validation and the planner."""
    arch = yaml.safe_load((REPO / "conf" / "model" / f"{entry}.yaml").read_text())["arch"]
    path = tmp_path / entry
    path.mkdir()
    (path / "config.json").write_text(json.dumps(arch))
    return str(path)


def _resolve(tmp_path, entry: str, gpus: int, gib: float, *overrides: str):
    config = compose_config(f"model={entry}", f"model.path={_model_dir(tmp_path, entry)}", "strategy=auto",
                            f"hardware.gpu_memory_gb={gib}", "train.micro_batch_size=1", "train.global_batch_size=8",
                            "data.max_seq_len=2048", f"run.dir={tmp_path / 'run'}", *overrides)
    lines: list[str] = []
    return resolve_auto_strategy(config, Devices(gpus, gib, "test"), say=lines.append), lines


AUTO_CASES = [
    ("llama-3.1-8b", 8, 80, "none", "fsdp", "none"),  # several GPUs: FSDP2, full fine-tuning fits
    ("llama-3.1-70b", 8, 80, "none", "zero3_offload", "none"),  # FSDP2 does not fit: offload to the host
    ("llama-3.1-8b", 1, 24, "none", "single", "lora"),  # one GPU, full does not fit: LoRA on a bf16 base
    ("llama-3.1-70b", 1, 80, "none", "single", "qlora"),  # LoRA does not fit either: QLoRA
    ("mistral-7b", 1, 80, "lora", "single", "lora"),  # the requested method fits: kept
    ("llama-3.1-70b", 2, 48, "none", "fsdp", "qlora"),  # several small GPUs, no host room: FSDP2 + QLoRA
]


def _host(gpus: int) -> str:
    return "hardware.host_memory_gb=1200" if gpus == 8 else "hardware.host_memory_gb=64"


@pytest.mark.parametrize(("entry", "gpus", "gib", "peft", "strategy", "method"), AUTO_CASES)
def test_auto_picks(tmp_path, entry, gpus, gib, peft, strategy, method):
    resolved, lines = _resolve(tmp_path, entry, gpus, gib, f"peft={peft}", _host(gpus))
    assert (resolved.strategy.name, resolved.peft.name) == (strategy, method)
    assert resolved.launcher.world_size == gpus
    if method != peft:
        assert resolved.train.precision == "bf16"  # the fallback runs on a bf16 base
    if method == "qlora" and strategy == "fsdp":
        assert resolved.peft.quant_storage == "bf16"  # so FSDP2 can shard the 4-bit weights
    record = json.loads((tmp_path / "run" / AUTO_RECORD).read_text())
    assert record["strategy"] == strategy and record["bytes_per_gpu"]["total"] <= gib * 1024**3
    assert f"strategy=auto -> {strategy} + peft={method}" in lines[0] and "chosen" in lines[0]


@pytest.mark.parametrize(("entry", "gpus", "gib", "peft", "strategy", "method"), AUTO_CASES)
def test_plan_shows_the_choice_train_would_make(entry, gpus, gib, peft, strategy, method):
    """`trainer plan strategy=auto` plans what `trainer train strategy=auto` would run on the same GPUs."""
    result = run_cli("plan", "--json", f"model={entry}", "strategy=auto", f"peft={peft}",
                     f"hardware.gpu_memory_gb={gib}", f"launcher.nproc_per_node={gpus}", "train.micro_batch_size=1",
                     "train.global_batch_size=8", "data.max_seq_len=2048", _host(gpus), timeout=60)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    configured = report["configured"]
    assert (configured["strategy"], configured["peft_method"], configured["fits"]) == (strategy, method, True)
    assert any(note.startswith(f"strategy=auto -> {strategy} + peft={method}") for note in report["notes"])


def test_plan_of_auto_when_nothing_fits_says_so(tmp_path):
    result = run_cli("plan", "model=llama-3.1-70b", "strategy=auto", "hardware.gpu_memory_gb=24", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "does NOT fit" in result.stdout and "nothing fits; the nearest miss is planned" in result.stdout


def test_nothing_fits_is_refused_naming_the_lightest_option(tmp_path):
    """70B on one 24 GB GPU: even QLoRA needs more, so the run is refused before launch, with the numbers."""
    with pytest.raises(ConfigError, match=r"single \+ qlora needs \d+\.\d GiB"):
        _resolve(tmp_path, "llama-3.1-70b", 1, 24, "peft=none")


def test_fallback_can_be_forbidden(tmp_path):
    with pytest.raises(ConfigError, match="allow_peft_fallback=false"):
        _resolve(tmp_path, "llama-3.1-8b", 1, 24, "peft=none", "strategy.allow_peft_fallback=false")


def test_checkpointing_is_turned_on_before_the_method_is_changed(tmp_path):
    resolved, _ = _resolve(tmp_path, "llama-3.1-8b", 1, 24, "peft=lora", "train.precision=bf16")
    assert resolved.peft.name == "lora" and resolved.train.gradient_checkpointing


def test_devices_come_from_hardware_settings_and_the_launcher(tmp_path):
    config = compose_config("strategy=auto", "hardware.gpu_memory_gb=40", "launcher.nproc_per_node=4",
                            "train.micro_batch_size=2", "train.global_batch_size=8", f"run.dir={tmp_path}")
    assert detect_devices(config) == Devices(4, 40.0, "hardware.gpu_memory_gb")


def test_without_gpus_or_hardware_settings_the_run_stays_on_one_cpu_process(tmp_path):
    config = compose_config("strategy=auto", f"run.dir={tmp_path}")
    resolved = resolve_auto_strategy(config, Devices(1, None, "no GPU"), say=lambda _: None)
    assert resolved.strategy.name == "single" and resolved.peft == config.peft


@pytest.mark.slow
def test_train_with_auto_freezes_the_concrete_choice(tmp_path):
    from trainer.config.frozen import load_frozen

    run_dir = tmp_path / "run"
    result = run_cli("train", f"run.dir={run_dir}", "strategy=auto", "train.max_steps=2", "train.micro_batch_size=4",
                     "train.global_batch_size=8", "eval.max_batches=1", "eval.generate_samples=0",
                     "logger.progress=false", "logger.plot=false", env={"CUDA_VISIBLE_DEVICES": ""})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "strategy=auto -> single" in result.stderr
    assert load_frozen(str(run_dir)).strategy.name == "single"
    assert json.loads((run_dir / AUTO_RECORD).read_text())["strategy"] == "single"
    assert read_summary(run_dir)["status"] == "completed"


def test_scheduler_nodes_are_planned_from_the_launcher_and_hardware_settings(tmp_path):
    common = ("strategy=auto", "launcher=slurm", "launcher.gpus_per_node=4", "launcher.nodes=2",
              "train.micro_batch_size=4", "train.global_batch_size=32", f"run.dir={tmp_path}")
    assert detect_devices(compose_config(*common, "hardware.gpu_memory_gb=80")) == Devices(8, 80.0, "launcher=slurm")
    with pytest.raises(ConfigError, match="hardware.gpu_memory_gb"):
        detect_devices(compose_config(*common))
