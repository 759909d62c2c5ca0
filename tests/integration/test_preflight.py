"""Mistakes in the model and PEFT sections are refused before anything heavy runs: one line naming the key, exit 2,
no run dir, and where a name is mistyped, the closest existing one (trainer/preflight.py)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

TINY = REPO / "trainer/assets/tiny-llama"
TRAIN = (f"data.path={REPO / 'tests/fixtures/data/alpaca.json'}", "train.max_steps=1", "train.global_batch_size=2")


@pytest.mark.parametrize("overrides, fragments", [
    (["peft=lora", "peft.target_modules=[q_projx]"], ["peft.target_modules", "'q_projx'", "did you mean q_proj?"]),
    (["peft=ia3", "peft.target_modules=[foo]"], ["peft.target_modules", "'foo' is no module of LlamaForCausalLM"]),
    (["peft=lora", "peft.modules_to_save=[lm_headx]"], ["peft.modules_to_save", "did you mean lm_head?"]),
    (["model.attn_implementation=flash_attention_2"], ["model.attn_implementation", "flash_attn package"]),
])
def test_mistyped_modules_and_missing_kernels_are_one_line_before_any_run_dir(tmp_path, overrides, fragments):
    run_dir = tmp_path / "run"
    result = run_cli("train", f"model.path={TINY}", *TRAIN, f"run.dir={run_dir}", *overrides, timeout=300)
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


@pytest.fixture
def model_without(tmp_path):
    """A copy of the tiny model without the files matching a pattern."""
    def copy(*patterns: str):
        target = tmp_path / "model"
        shutil.copytree(TINY, target, ignore=shutil.ignore_patterns(*patterns))
        return target
    return copy


def test_a_model_dir_without_a_tokenizer_says_so_and_how_to_go_on(model_without, tmp_path):
    model = model_without("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt")
    for command in (("train", f"run.dir={tmp_path / 'run'}"), ("data", "check")):
        result = run_cli(*command, f"model.path={model}", *TRAIN, timeout=300)
        assert_one_line_error(result, "model.path", "has no tokenizer", "set model.tokenizer")
    assert not (tmp_path / "run").exists()
    # A file listing, answered before torch or transformers are imported (in about a second, not ~10).
    code = ("import sys\nfrom trainer.cli import main\ntry:\n"
            f"    rc = main(['train', 'model.path={model}', 'run.dir={tmp_path / 'run'}', *{list(TRAIN)!r}])\n"
            "except SystemExit as stop:\n    rc = stop.code\n"
            "print('RESULT', rc, [m for m in ('torch', 'transformers') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.stdout.strip().splitlines()[-1] == "RESULT 2 []", out.stdout + out.stderr
    # Naming the base model's tokenizer is the way on.
    check = run_cli("data", "check", f"model.path={model}", f"model.tokenizer={TINY}", *TRAIN, timeout=300)
    assert check.returncode == 0, check.stderr


def test_a_model_dir_without_weights_or_config_is_refused_before_tokenising(model_without, tmp_path):
    result = run_cli("train", f"model.path={model_without('*.safetensors')}", *TRAIN, f"run.dir={tmp_path / 'r'}",
                     timeout=300)
    assert_one_line_error(result, "model.path", "holds no weights", "model.init=random")
    shutil.rmtree(tmp_path / "model")
    result = run_cli("train", f"model.path={model_without('config.json')}", *TRAIN, f"run.dir={tmp_path / 'r'}",
                     timeout=300)
    assert_one_line_error(result, "model.path", "has no config.json")
    assert not (tmp_path / "r").exists()


def test_cfg_job_refuses_what_train_refuses(tmp_path):
    result = run_cli("train", f"model.path={TINY}", *TRAIN, "peft=lora", "peft.target_modules=[q_projx]",
                     "--cfg", "job", timeout=300)
    assert_one_line_error(result, "did you mean q_proj?")
