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
    assert_one_line_error(run_cli("eval", str(lora_run)), "eval: give --data FILE, --split val|test or --harness TASK")
    assert_one_line_error(run_cli("eval", str(lora_run), "--data", str(ALPACA), "--split", "val"),
                          "eval: give --data FILE or --split val|test, not both")
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


# A local lm-evaluation-harness task (the hub is out of reach here): which colour an unseen creature of the demo world
# has, its six colours as choices, scored by log-likelihood.
HARNESS_TASK = """\
task: demo_facts_colour
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "### Instruction:\\n{{{{question}}}}\\n\\n### Response:\\n"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def _colour_task(directory):
    records = [json.loads(line) for line in (REPO / "trainer/assets/demo-facts/val.jsonl").read_text().splitlines()]
    facts = [m.groups() for r in records for m in [re.fullmatch(r"The (\w+) is (\w+)\.", r["output"])] if m]
    colours = sorted({colour for _, colour in facts})
    directory.mkdir()
    docs = [{"question": f"What colour is the {name}?", "choices": [f"The {name} is {c}." for c in colours],
             "answer": colours.index(colour)} for name, colour in facts]
    (directory / "colour.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    (directory / "demo_facts_colour.yaml").write_text(HARNESS_TASK.format(data=directory / "colour.jsonl"))
    return directory


def test_lm_evaluation_harness_runs_a_local_task_on_the_run_and_its_base(lora_run, tmp_path):
    """The harness scores our model objects (the base, and the run's adapter on it) as it scores the same weights
    it loads itself: the base model dir, and the run exported merged."""
    pytest.importorskip("lm_eval")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    tasks = _colour_task(tmp_path / "tasks")
    out = tmp_path / "harness.json"
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    result = run_cli("eval", str(lora_run), "--base-too", "--harness", "demo_facts_colour", "--harness-include",
                     str(tasks), "--json", str(out), env=offline, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lm-evaluation-harness: demo_facts_colour" in result.stdout
    ours = {name: target["metrics"]["demo_facts_colour/acc"] for name, target in
            json.loads(out.read_text())["targets"].items()}
    assert set(ours) == {"base", "facts-lora"}
    merged = tmp_path / "merged"
    export = run_cli("export", str(lora_run), "--to", "merged", "--out", str(merged), "--dtype", "fp32")
    assert export.returncode == 0, export.stderr[-2000:]
    manager = TaskManager(include_path=str(tasks))
    for name, path in (("base", REPO / "trainer/assets/tiny-llama"), ("facts-lora", merged)):
        theirs = simple_evaluate(model="hf", model_args=f"pretrained={path},dtype=float32", tasks=["demo_facts_colour"],
                                 task_manager=manager, device="cpu")["results"]["demo_facts_colour"]["acc,none"]
        assert ours[name] == pytest.approx(theirs), name


def test_harness_mistakes_are_one_line(lora_run):
    pytest.importorskip("lm_eval")
    assert_one_line_error(run_cli("eval", str(lora_run), "--harness", "hellaswagg", timeout=300),
                          "'hellaswagg' is no lm-evaluation-harness task", "did you mean hellaswag?")
    assert_one_line_error(run_cli("eval", str(lora_run), "--harness", "x", "--harness-include", "/nonexistent"),
                          "--harness-include '/nonexistent' is not a directory")
    assert_one_line_error(run_cli("eval", str(lora_run), "--harness-include", str(lora_run)),
                          "--harness-include adds task definitions for --harness TASK")


def test_harness_metrics_keep_the_filter_they_were_taken_with():
    from launch.harness import metric_name

    assert metric_name("arc_easy", "acc,none") == "arc_easy/acc"
    assert metric_name("gsm8k", "exact_match,strict-match") != metric_name("gsm8k", "exact_match,flexible-extract")


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
