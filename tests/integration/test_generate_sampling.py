"""`trainer generate` sampling (--temperature, --top-p, --seed) and --chat, on the embedded tiny base model (and
small random LoRA adapters made with PEFT here), so no training run is needed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_one_line_error, run_cli

TINY = str(REPO / "trainer" / "assets" / "tiny-llama")
QUESTIONS = ["Where does the flunk live?", "Which colour does the bolep have?", "hi"]
SAMPLE = ("--temperature", "1.0")


def _generate(*args: str) -> subprocess.CompletedProcess:
    result = run_cli("generate", *args, "--max-new-tokens", "8", "--json", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _answers(*args: str) -> dict[str, list[str]]:
    answers: dict[str, list[str]] = {}
    for line in _generate(*args).stdout.splitlines():
        record = json.loads(line)
        answers.setdefault(record["adapter"], []).append(record["output"])
    return answers


def _chat(*args: str, lines: list[str]) -> subprocess.CompletedProcess:
    """`trainer generate --chat` with `lines` piped to its stdin (run_cli gives no stdin)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "trainer.cli", "generate", *args, "--chat", "--max-new-tokens", "8"],
                            input="".join(line + "\n" for line in lines), capture_output=True, text=True,
                            timeout=300, env=env, cwd=str(REPO))
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> tuple[Path, Path]:
    """Two LoRA adapters on the tiny base with different random weights (as if trained differently)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sampling-adapters")
    for seed, name in enumerate(("a", "b")):
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(TINY),
                               LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.normal_(0, 0.05, generator=generator)
        model.save_pretrained(root / name)
    return root / "a", root / "b"


def test_temperature_zero_is_greedy_and_a_tiny_nucleus_is_too():
    greedy = _answers(TINY, *QUESTIONS)
    explicit = _generate(TINY, *QUESTIONS, "--temperature", "0", "--top-p", "0.5", "--seed", "3")
    assert "only matter when sampling" in explicit.stderr  # an ignored setting is said, not silently dropped
    assert {"base": [json.loads(line)["output"] for line in explicit.stdout.splitlines()]} == greedy
    # only the most likely token survives a nucleus this small, so sampling picks what greedy picks
    assert _answers(TINY, *QUESTIONS, *SAMPLE, "--top-p", "1e-6", "--seed", "3") == greedy


def test_a_seed_repeats_its_samples_and_other_seeds_differ():
    first = _answers(TINY, *QUESTIONS, *SAMPLE, "--seed", "0")
    assert _answers(TINY, *QUESTIONS, *SAMPLE, "--seed", "0") == first
    others = []
    for seed in ("1", "2", "3"):  # stop at the first that differs: one suffices to show the seed is used
        others.append(_answers(TINY, *QUESTIONS, *SAMPLE, "--seed", seed))
        if others[-1] != first:
            break
    assert others[-1] != first, (first, others)


def test_an_adapters_samples_do_not_depend_on_the_adapters_beside_it(adapters):
    a, b = adapters
    alone = _answers(TINY, f"--adapter=b={b}", *QUESTIONS, *SAMPLE, "--seed", "5")
    together = _answers(TINY, f"--adapter=a={a}", f"--adapter=b={b}", "--base-too", *QUESTIONS, *SAMPLE,
                        "--seed", "5")
    assert set(together) == {"base", "a", "b"}
    assert together["b"] == alone["b"]  # its own generator, seeded afresh: a (and the base) ran first
    assert together["a"] != together["b"]


def test_chat_answers_each_line_with_the_conversation_so_far():
    lines = ["hi", "Where does the flunk live?", "/reset", "hi", "/exit", "never read"]
    records = [json.loads(line) for line in _chat(TINY, "--json", lines=lines).stdout.splitlines()]
    assert [r["prompt"] for r in records] == ["hi", "Where does the flunk live?", "hi"]
    assert [r["turn"] for r in records] == [0, 1, 2]
    first, second, after_reset = records
    assert second["input"].startswith(first["input"] + first["output"])  # the first exchange, then the new line
    assert second["input"].endswith("Where does the flunk live?<|im_end|>\n<|im_start|>assistant\n")
    assert (after_reset["input"], after_reset["output"]) == (first["input"], first["output"])  # history forgotten
    # piped (no terminal): no prompt marker, just one answer per line
    assert _chat(TINY, lines=lines).stdout == "".join(r["output"] + "\n" for r in records)


def test_chat_with_one_adapter_and_a_system_message_ends_at_end_of_input(adapters):
    a, _ = adapters
    result = _chat(TINY, f"--adapter=a={a}", "--system", "Answer briefly.", "--json", *SAMPLE, lines=["hi", "who?"])
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["adapter"] for r in records] == ["a", "a"]
    assert all(r["input"].startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n") for r in records)


def test_system_message_opens_one_shot_prompts():
    result = _generate(TINY, "hi", "--system", "Answer briefly.")
    assert json.loads(result.stdout)["input"] == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                                                  "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize("args, fragments", [
    (("hi", "--temperature", "-1"), ("--temperature must be a number >= 0",)),
    (("hi", "--temperature", "nan"), ("--temperature must be a number >= 0",)),
    (("hi", "--temperature", "warm"), ("--temperature", "invalid float value")),
    (("hi", "--temperature", "1", "--top-p", "0"), ("--top-p must be in (0, 1]",)),
    (("hi", "--top-p", "1.5"), ("--top-p must be in (0, 1]",)),
    (("hi", "--temperature", "1", "--seed", "-1"), ("--seed must be between 0",)),
    (("hi", "--chat"), ("--chat reads the conversation from stdin",)),
    (("--chat", "--template", "none"), ("--chat needs a chat template", "drop --template none")),
    (("hi", "--system", "Be brief.", "--template", "none"), ("--system needs a chat template",)),
])
def test_bad_sampling_and_chat_options_are_one_line(args, fragments):
    assert_one_line_error(run_cli("generate", TINY, *args, timeout=120), *fragments)


@pytest.mark.parametrize("extra", [("--adapter=b={b}",), ("--base-too",)])
def test_chat_with_more_than_one_model_is_one_line(adapters, extra):
    a, b = adapters
    extra = tuple(arg.format(b=b) for arg in extra)
    result = run_cli("generate", TINY, f"--adapter=a={a}", *extra, "--chat", timeout=120)
    assert_one_line_error(result, "--chat talks with one model or adapter, got 2")
