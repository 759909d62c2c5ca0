"""Code shipped inside a model dir (transformers' `auto_map`) runs only when the user sets model.trust_remote_code."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.conftest import assert_one_line_error, read_summary, run_cli

CONFIGURATION = '''from transformers import LlamaConfig


class TinyCustomConfig(LlamaConfig):
    model_type = "tinycustom"
'''
# Leaves a mark when transformers imports it: the proof that the shipped code ran (or did not).
MODELING = '''import os

from transformers import LlamaForCausalLM

from .configuration_tinycustom import TinyCustomConfig

open(os.environ["REMOTE_CODE_MARK"], "w").close()


class TinyCustomForCausalLM(LlamaForCausalLM):
    config_class = TinyCustomConfig
'''


def _model_with_its_own_code(tmp_path: Path) -> Path:
    from launch.compose import asset_path

    model = tmp_path / "custom-model"
    shutil.copytree(asset_path("tiny-llama"), model)
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="tinycustom", architectures=["TinyCustomForCausalLM"],
                  auto_map={"AutoConfig": "configuration_tinycustom.TinyCustomConfig",
                            "AutoModelForCausalLM": "modeling_tinycustom.TinyCustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_tinycustom.py").write_text(CONFIGURATION)
    (model / "modeling_tinycustom.py").write_text(MODELING)
    return model


def test_shipped_code_is_refused_before_it_runs_and_runs_when_trusted(tmp_path):
    model, mark = _model_with_its_own_code(tmp_path), tmp_path / "remote-code-ran"
    env = {"REMOTE_CODE_MARK": str(mark), "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}
    common = (f"model.path={model}", "train.max_steps=2", "train.micro_batch_size=4", "train.global_batch_size=4",
              "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false")

    refused = run_cli("train", f"run.dir={tmp_path / 'refused'}", *common, env=env, timeout=120)
    assert_one_line_error(refused, "model.trust_remote_code", "configuration_tinycustom.TinyCustomConfig")
    assert not mark.exists() and not (tmp_path / "refused").exists()

    trusted = run_cli("train", f"run.dir={tmp_path / 'trusted'}", *common, "model.trust_remote_code=true", env=env,
                      timeout=600)
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert mark.exists() and read_summary(tmp_path / "trusted")["status"] == "completed"
