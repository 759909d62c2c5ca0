"""`trainer eval`: a run's adapter and its base scored side by side on a data file, through the CLI."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import QUICK, REPO, assert_one_line_error, run_cli

ALPACA = REPO / "tests/fixtures/data/alpaca.json"
METRICS = {"loss", "perplexity", "exact_match", "token_f1", "bleu", "rouge1", "rouge2", "rougeL",
           "time_to_first_token_s", "decode_tokens_per_second"}


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("eval") / "facts-lora"
    result = run_cli("train", f"run.dir={run_dir}", *QUICK, "peft=lora", "optim.lr=5e-3", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def test_a_run_and_its_base_are_scored_side_by_side_with_the_field_s_own_bleu_and_rouge(lora_run, tmp_path):
    import sacrebleu
    from rouge_score import rouge_scorer

    out = tmp_path / "scores.json"
    result = run_cli("eval", str(lora_run), "--data", str(ALPACA), "--base-too", "--max-new-tokens", "12",
                     "--json", str(out), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    header = next(line for line in result.stdout.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "base", "facts-lora"]
    report = json.loads(out.read_text())
    targets = report["targets"]
    assert set(targets) == {"base", "facts-lora"} and report["samples"] == len(targets["base"]["answers"]) > 5
    for name, target in targets.items():
        metrics, answers = target["metrics"], target["answers"]
        assert set(metrics) == METRICS, name
        references = [a["reference"] for a in answers]
        outputs = [a["answer"] for a in answers]
        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [references]).score / 100)
        scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
        scores = [scorer.score(r, o) for r, o in zip(references, outputs)]
        for key in ("rouge1", "rouge2", "rougeL"):
            assert metrics[key] == pytest.approx(sum(s[key].fmeasure for s in scores) / len(scores)), key
        assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)
        assert metrics["time_to_first_token_s"] > 0 and metrics["decode_tokens_per_second"] > 0
    # The adapter is what was trained: it changes the loss on the data it learnt from.
    assert targets["facts-lora"]["metrics"]["loss"] != pytest.approx(targets["base"]["metrics"]["loss"], rel=1e-3)


def test_eval_mistakes_are_one_line(lora_run, tmp_path):
    assert_one_line_error(run_cli("eval", str(lora_run), "--data", str(tmp_path / "none.jsonl")),
                          "eval: --data", "does not exist")
    assert_one_line_error(run_cli("eval", str(lora_run)), "eval: give --data FILE or --split val|test")
    assert_one_line_error(run_cli("eval", str(lora_run), "--split", "test"),  # the demo holds out no test records
                          "test split is empty (data.test_ratio=0", "train with data.test_ratio > 0")
    assert_one_line_error(run_cli("eval", str(REPO / "trainer/assets/tiny-llama"), "--split", "val"),
                          "eval: --split needs a run dir")
    assert_one_line_error(run_cli("eval", str(lora_run), "--data", str(ALPACA), "--max-samples", "-1"),
                          "eval: --max-samples must be >= 0")
    text = tmp_path / "notes.txt"
    text.write_text("just some prose\n")
    assert_one_line_error(run_cli("eval", str(lora_run), "--data", str(text), timeout=300),
                          "has no record with a prompt and an answer")


def test_a_run_is_scored_on_the_test_split_its_training_held_out(tmp_path):
    """data.test_ratio holds records out of training; `--split test` scores exactly those (as many as the training
    log says it held out, none of them among the validation records), `--split val` the validation file's."""
    run_dir = tmp_path / "held-out"
    trained = run_cli("train", f"run.dir={run_dir}", *QUICK, "data.test_ratio=0.1", "eval.generate_samples=0",
                      timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    held = int(re.search(r"training samples \(\d+ validation, (\d+) test\)", trained.stderr).group(1))
    prompts = {}
    for split in ("test", "val"):
        out = tmp_path / f"{split}.json"
        result = run_cli("eval", str(run_dir), "--split", split, "--max-new-tokens", "2", "--json", str(out),
                         timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(out.read_text())
        assert report["split"] == split and report["data"] is None
        prompts[split] = [a["prompt"] for a in report["targets"]["held-out"]["answers"]]
    assert len(prompts["test"]) == held > 0
    val_file = REPO / "trainer/assets/demo-facts/val.jsonl"
    assert len(prompts["val"]) == len(val_file.read_text().splitlines())
    assert not set(prompts["test"]) & set(prompts["val"])
