"""Mistakes in the model and PEFT sections are refused before anything heavy runs: one line naming the key, exit 2,
no run dir, and where a name is mistyped, the closest existing one (trainer/preflight.py)."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

TINY = REPO / "trainer/assets/tiny-llama"
TRAIN = (f"data.path={REPO / 'tests/fixtures/data/alpaca.json'}", "train.max_steps=1", "train.global_batch_size=2")


HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
# Mistakes `trainer train` refuses before any run dir, and the line that says so: (overrides, fragments).
REFUSED = [
    pytest.param(["peft=lora", "peft.target_modules=[q_projx]"],
                 ["peft.target_modules", "'q_projx'", "did you mean q_proj?"], id="q_projx"),
    pytest.param(["peft=ia3", "peft.target_modules=[foo]"],
                 ["peft.target_modules", "'foo' is no module of LlamaForCausalLM"], id="ia3-foo"),
    pytest.param(["peft=lora", "peft.modules_to_save=[lm_headx]"],
                 ["peft.modules_to_save", "did you mean lm_head?"], id="lm_headx"),
    pytest.param(["model.attn_implementation=flash_attention_2"], ["model.attn_implementation", "flash_attn package"],
                 id="flash_attention_2",
                 marks=pytest.mark.skipif(HAS_FLASH_ATTN, reason="flash_attn is installed: the kernel is there")),
]


@pytest.mark.parametrize("overrides, fragments", REFUSED)
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
    cache = tmp_path / "cache"  # a run tokenises into <paths.cache_dir>/data/<fingerprint>/ (trainer/data/cache.py)
    result = run_cli("train", f"model.path={model_without('*.safetensors')}", *TRAIN, f"run.dir={tmp_path / 'r'}",
                     f"paths.cache_dir={cache}", timeout=300)
    assert_one_line_error(result, "model.path", "holds no weights", "model.init=random")
    shutil.rmtree(tmp_path / "model")
    result = run_cli("train", f"model.path={model_without('config.json')}", *TRAIN, f"run.dir={tmp_path / 'r'}",
                     f"paths.cache_dir={cache}", timeout=300)
    assert_one_line_error(result, "model.path", "has no config.json")
    assert not (tmp_path / "r").exists()
    assert not cache.exists() or not any(cache.rglob("*")), sorted(cache.rglob("*"))  # refused before tokenising


@pytest.mark.parametrize("overrides, fragments", [
    *REFUSED,
    pytest.param(["train.micro_batch_size=2", "train.global_batch_size=7"],
                 ["train.global_batch_size", "7 is not a multiple of micro_batch_size"], id="global_batch_size=7"),
])
def test_cfg_job_refuses_what_train_refuses(overrides, fragments):
    """`--cfg job` prints what the run would freeze, so it refuses what `trainer train` refuses, with the same line,
    and prints no config."""
    result = run_cli("train", f"model.path={TINY}", *TRAIN, *overrides, "--cfg", "job", timeout=300)
    assert_one_line_error(result, *fragments)
    assert not result.stdout.strip(), result.stdout[-2000:]
