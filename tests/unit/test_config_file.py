"""Your own config: `trainer train|plan|data check my.yaml` and Hydra's -cd/-cn for every composing command."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, assert_one_line_error, compose_config, run_cli

CHAT = REPO / "tests/fixtures/data/chat.jsonl"
TINY = REPO / "trainer/assets/tiny-llama"
MY_RUN = f"""\
defaults:
  - peft: qlora
data:
  path: {CHAT}
  sources: []
optim:
  lr: 1.0e-4
  betas: [0.9, 0.95]
model:
  arch:
    rope_scaling: {{rope_type: linear, factor: 2.0}}
"""


def test_a_config_file_composes_like_the_overrides_it_holds_and_the_command_line_wins(tmp_path):
    mine = tmp_path / "my-run.yaml"
    mine.write_text(MY_RUN)
    from_file = compose_config(str(mine))
    assert from_file.peft.name == "qlora" and from_file.optim.lr == 1e-4 and from_file.data.path == str(CHAT)
    assert list(from_file.optim.betas) == [0.9, 0.95]
    assert from_file.model.arch["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    later = compose_config(str(mine), "optim.lr=5e-5", "peft=lora")
    assert later.optim.lr == 5e-5 and later.peft.name == "lora"
    # through the CLI, as a user runs it: `trainer train my-run.yaml` (here, what it would freeze)
    job = run_cli("train", str(mine), "optim.lr=5e-5", "--cfg", "job", timeout=120)
    assert job.returncode == 0, job.stderr
    assert "lr: 5.0e-05" in job.stdout and "name: qlora" in job.stdout


def test_mistakes_in_a_config_file_are_one_line_naming_the_key_or_the_line(tmp_path):
    (tmp_path / "typo.yaml").write_text("optim:\n  lrr: 1e-4\n")
    (tmp_path / "broken.yaml").write_text("optim:\n  lr: [1e-4\n")
    assert_one_line_error(run_cli("plan", str(tmp_path / "typo.yaml")), "optim.lrr", "did you mean optim.lr?")
    assert_one_line_error(run_cli("plan", str(tmp_path / "broken.yaml")), "broken.yaml", "line 2")
    assert_one_line_error(run_cli("plan", str(tmp_path / "none.yaml")), "none.yaml", "does not exist")


@pytest.mark.parametrize("flag", [["-cd"], ["--config-dir"]])
def test_a_config_dir_of_your_own_works_for_plan_and_train_cfg_job(tmp_path, flag):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        f"# @package _global_\ndefaults:\n  - override /peft: dora\nmodel:\n  path: {TINY}\n"
        f"data:\n  path: {CHAT}\noptim:\n  lr: 3.0e-4\n")
    plan = run_cli("plan", *flag, str(tmp_path), "experiment=mine", "--json")
    assert plan.returncode == 0, plan.stderr
    planned = json.loads(plan.stdout)
    assert planned["model"] == "tiny-llama" and planned["configured"]["peft_method"] == "dora"
    job = run_cli("train", *flag, str(tmp_path), "experiment=mine", "--cfg", "job")
    assert job.returncode == 0, job.stderr
    assert "lr: 0.0003" in job.stdout and "name: dora" in job.stdout


def test_a_typo_inside_your_own_experiment_names_the_key_the_closest_one_and_the_file(tmp_path):
    """Every command that composes a config words a mistake inside a config dir's file the same way."""
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text("# @package _global_\noptim:\n  lrr: 0.1\n")
    (tmp_path / "experiment" / "wrong_type.yaml").write_text("# @package _global_\noptim:\n  lr: fast\n")
    for command, after in ((["train"], [f"run.dir={tmp_path / 'run'}"]), (["train"], ["--cfg", "job"]), (["plan"], []),
                           (["data", "check"], [])):
        result = run_cli(*command, "-cd", str(tmp_path), "experiment=mine", *after, timeout=120)
        assert_one_line_error(result, "optim.lrr", "did you mean optim.lr?")
        assert "(in experiment/mine.yaml)" in result.stderr, (command, result.stderr)
    result = run_cli("plan", "--config-dir", str(tmp_path), "experiment=wrong_type")
    assert_one_line_error(result, "optim.lr", "could not be converted to Float (in experiment/wrong_type.yaml)")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", [["-cd", "{dir}", "experiment=mine"], ["--config-dir", "{dir}", "experiment=mine"],
                                 ["{dir}/mine.yaml"]], ids=["-cd", "--config-dir", "my.yaml"])
def test_data_check_takes_your_own_config_dir_and_config_file(tmp_path, how):
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "mine.yaml").write_text(
        f"# @package _global_\nmodel:\n  path: {TINY}\ndata:\n  path: {CHAT}\n  max_seq_len: 96\n"
        "train:\n  micro_batch_size: 1\n  global_batch_size: 1\n")
    (tmp_path / "mine.yaml").write_text(f"model:\n  path: {TINY}\ndata:\n  path: {CHAT}\n  max_seq_len: 96\n"
                                        "train:\n  micro_batch_size: 1\n  global_batch_size: 1\n")
    args = [arg.format(dir=tmp_path) for arg in how]
    result = run_cli("data", "check", *args, f"paths.cache_dir={tmp_path / 'cache'}", timeout=300)
    assert result.returncode == 0, (args, result.stderr[-2000:])
    assert "chat.jsonl" in result.stdout and "max_seq_len 96" in result.stdout, result.stdout[-2000:]  # the file's


@pytest.mark.parametrize("command", [["train"], ["plan"], ["data", "check"]], ids="-".join)
def test_the_help_of_every_composing_command_names_your_own_config_file_and_dir(command):
    result = run_cli(*command, "--help", timeout=60)
    assert result.returncode == 0, result.stderr
    usage = result.stdout.splitlines()[0]
    assert usage.startswith(f"usage: trainer {' '.join(command)} [my.yaml] [OVERRIDES]") and "[-cd DIR]" in usage
    lines = [line.split() for line in result.stdout.splitlines()]
    assert any(words[:2] == ["my.yaml", "your"] for words in lines), result.stdout[:2000]
    assert any(words[:3] == ["-cd", "DIR", "add"] for words in lines), result.stdout[:2000]
    if command == ["train"]:
        assert "== Configuration groups ==" in result.stdout  # Hydra's own help follows
