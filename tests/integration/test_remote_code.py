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


def test_generate_asks_for_its_own_flag_and_export_follows_the_runs_decision(tmp_path):
    model = _model_with_its_own_code(tmp_path)
    run_dir = tmp_path / "run"

    def env(mark: str) -> dict:
        return {"REMOTE_CODE_MARK": str(tmp_path / f"mark-{mark}"), "HF_MODULES_CACHE": str(tmp_path / "hf-modules")}

    trained = run_cli("train", f"run.dir={run_dir}", f"model.path={model}", "model.trust_remote_code=true",
                      "train.max_steps=1", "train.micro_batch_size=4", "train.global_batch_size=4",
                      "eval.max_batches=1", "eval.generate_samples=0", "logger.progress=false", "logger.plot=false",
                      env=env("trained"), timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]

    refused = run_cli("generate", str(run_dir), "What colour is the kum?", env=env("refused"), timeout=120)
    assert_one_line_error(refused, str(model), "--trust-remote-code")
    assert not (tmp_path / "mark-refused").exists()
    answered = run_cli("generate", str(run_dir), "What colour is the kum?", "--trust-remote-code", "--json",
                       "--max-new-tokens", "4", env=env("answered"), timeout=300)
    assert answered.returncode == 0, answered.stderr[-3000:]
    assert (tmp_path / "mark-answered").exists() and json.loads(answered.stdout.splitlines()[0])["output"] is not None

    # The run itself was trusted (its frozen model.trust_remote_code): exporting it merges into the same base.
    merged = run_cli("export", str(run_dir), "--to", "merged", "--out", str(tmp_path / "merged"), env=env("merged"),
                     timeout=600)
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert (tmp_path / "mark-merged").exists() and (tmp_path / "merged" / "config.json").is_file()
