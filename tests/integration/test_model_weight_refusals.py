"""Damaged or foreign model weights given as model.path: one line naming the file and what to do, exit 2, no
traceback, before a run dir exists. About 1 minute."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

TINY = REPO / "trainer" / "assets" / "tiny-llama"


def _copy(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    shutil.copytree(TINY, model)
    return model


def _truncate(model: Path) -> str:
    weights = model / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    return "truncated or damaged"


def _damage_header(model: Path) -> str:
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"#" * 32  # the JSON header's start
    weights.write_bytes(bytes(data))
    return "truncated or damaged"


def _disagreeing_config(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] = config["intermediate_size"] * 2
    (model / "config.json").write_text(json.dumps(config))
    return "does not belong to these weights"


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/trainer-test-pwned",))


def _malicious_pickle(model: Path) -> str:
    import torch

    (model / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, model / "pytorch_model.bin")  # torch's own format, its pickle naming os.system
    return "names code to run"


CASES = {"truncated": _truncate, "damaged header": _damage_header, "config disagrees": _disagreeing_config,
         "malicious .bin": _malicious_pickle}


@pytest.mark.parametrize("case", sorted(CASES))
def test_refused_in_one_line_naming_the_file(case, tmp_path):
    model = _copy(tmp_path)
    fragment = CASES[case](model)
    data = tmp_path / "train.jsonl"  # not the demo's own file, which this model would be warned about
    shutil.copyfile(REPO / "trainer/assets/demo-facts/train.jsonl", data)
    result = run_cli("train", f"run.dir={tmp_path / 'run'}", f"model.path={model}", f"model.tokenizer={TINY}",
                     "train.max_steps=1", f"data.path={data}")
    assert_one_line_error(result, str(model), fragment)
    assert "weights_only=False`" not in result.stderr  # torch's advice to load it unrestricted is never passed on
    assert not (tmp_path / "run").exists()
    assert not Path("/tmp/trainer-test-pwned").exists()


def test_a_checkpoint_whose_dcp_metadata_names_code_is_refused_in_one_line(tmp_path):
    """The same size as the real `.metadata` (sizes are checked at resume) and checksums off, so the unpickler is
    what meets it."""
    run_dir = tmp_path / "run"
    common = (f"run.dir={run_dir}", "train.micro_batch_size=4", "train.global_batch_size=8", "eval.max_batches=1",
              "eval.generate_samples=0", "logger.progress=false", "logger.plot=false", "checkpoint.every_n_steps=1",
              "checkpoint.checksum=false")
    first = run_cli("train", *common, "train.max_steps=1", env={"OMP_NUM_THREADS": "1"})
    assert first.returncode == 0, first.stderr[-3000:]
    metadata = run_dir / "checkpoints" / "step-000001" / "state" / ".metadata"
    evil = pickle.dumps(_Evil())
    assert len(evil) <= metadata.stat().st_size
    metadata.write_bytes(evil + b"\0" * (metadata.stat().st_size - len(evil)))
    result = run_cli("train", *common, "train.max_steps=2", env={"OMP_NUM_THREADS": "1"})
    # The run had started (its info lines come first): the refusal is the last line, exit 2, no traceback.
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("trainer: ") and str(metadata) in last and "refusing to unpickle posix.system" in last
    assert not Path("/tmp/trainer-test-pwned").exists()
