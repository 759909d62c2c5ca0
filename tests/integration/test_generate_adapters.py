"""`trainer generate` serving two adapters from one base: each answers as it does loaded alone."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli
from tests.integration.adapter_runs import QUESTIONS


def _generate(*args: str) -> dict[str, list[str]]:
    result = run_cli("generate", *args, *QUESTIONS, "--max-new-tokens", "8", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    answers: dict[str, list[str]] = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        answers.setdefault(record["adapter"], []).append(record["output"])
    return answers


@pytest.mark.slow
def test_two_adapters_on_one_base_answer_as_each_does_alone(two_runs):
    facts, shrug = two_runs
    base = str(REPO / "trainer" / "assets" / "tiny-llama")
    both = _generate(base, f"--adapter=facts={facts}", f"--adapter=shrug={shrug}", "--base-too")
    assert set(both) == {"base", "facts", "shrug"}
    assert both["facts"] == _generate(str(facts))["facts"]  # a run dir alone: its adapter is named after the run
    assert both["shrug"] == _generate(str(shrug))["shrug"]
    assert both["shrug"] != both["facts"] and both["facts"] != both["base"]
    assert sum("meadow is purple" in answer for answer in both["shrug"]) >= 2, both["shrug"]  # what it was taught


@pytest.mark.slow
def test_prompts_file_and_template_are_used(two_runs, tmp_path):
    facts, _ = two_runs
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"instruction": QUESTIONS[0]}) + "\n" + json.dumps({"prompt": QUESTIONS[1]}) + "\n")
    result = run_cli("generate", str(facts), "--prompts", str(prompts), "--json", "--max-new-tokens", "4", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["prompt"] for r in records] == QUESTIONS[:2]
    # the run trained with the alpaca template, so that is how the prompt reaches the model
    assert records[0]["input"] == f"### Instruction:\n{QUESTIONS[0]}\n\n### Response:\n"


def test_bad_adapter_argument_is_one_line(tmp_path):
    result = run_cli("generate", str(tmp_path), "hello", "--adapter", "oops", timeout=60)
    assert_one_line_error(result, "NAME=PATH")


def test_damaged_adapter_config_is_one_line_naming_the_file(tmp_path):
    """An adapter dir whose adapter_config.json was cut off mid-write: named with its line, not a traceback."""
    from launch.compose import asset_path

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{\n  "peft_type": "LORA",\n  "r": ')
    result = run_cli("generate", asset_path("tiny-llama"), "hello", "--adapter", f"cut={adapter}", timeout=120)
    assert_one_line_error(result, f"{adapter / 'adapter_config.json'}:3", "not valid JSON")
