"""Real public file layouts read as their authors meant, on the project's own fixtures written in the same shapes
(tests/fixtures/data/real-shapes): HH-RLHF strings, KTO labels, LLaMA-Factory preference pairs, axolotl's missing
turns, single-record JSON, own column names, tool calls, odd turn orders, long documents."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import FIXTURES, REPO

SHAPES = FIXTURES / "data" / "real-shapes"
TOKENIZER = REPO / "trainer" / "assets" / "tiny-llama"


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.config.schema import ModelConfig
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(TOKENIZER)))


def _parse(**overrides):
    from trainer.config.schema import DataConfig
    from trainer.data import parse_sources

    return parse_sources(DataConfig(**{"val_ratio": 0.0, "template": "chatml", "max_seq_len": 256, **overrides}))


def _datasets(tokenizer, **overrides):
    from trainer.config.schema import DataConfig
    from trainer.data import prepare_datasets

    cfg = DataConfig(**{"val_ratio": 0.0, "template": "chatml", "max_seq_len": 256, "cache": False, **overrides})
    return prepare_datasets(cfg, tokenizer, seed=0)


def _data_check(*overrides: str, tmp_path) -> subprocess.CompletedProcess:
    env_cache = f"paths.cache_dir={tmp_path / 'cache'}"
    return subprocess.run([sys.executable, "-m", "trainer.cli", "data", "check", env_cache, *overrides],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_hh_rlhf_strings_become_the_conversation_they_hold():
    parsed = _parse(path=str(SHAPES / "hh_rlhf.jsonl"), format="auto")
    assert parsed.formats == ["preference"] and parsed.reports[0].skipped == {}
    first, multi_turn = parsed.examples[0][0], parsed.examples[0][1]
    assert [(m.role, m.content) for m in first.messages] == [
        ("user", "How do I keep cut flowers fresh?"),
        ("assistant", "Trim the stems at an angle and change the water every two days.")]
    assert [m.content for m in first.rejected] == ["Put them in the sun."]
    assert [m.role for m in multi_turn.messages] == ["user", "assistant", "user", "assistant"]
    assert multi_turn.messages[-1].content == "Sir Whiskers of Ashford." and multi_turn.rejected[-1].content == "Cat."


def test_kto_undesirable_answers_are_never_trained_and_are_counted(tokenizer):
    parsed = _parse(path=str(SHAPES / "kto.json"), format="auto")
    kept = [m.content for e in parsed.examples[0] for m in e.messages if m.role == "assistant"]
    assert kept == ["Blue is a primary colour.", "A spider has eight legs."]
    assert parsed.reports[0].skipped == {"undesirable": 2}
    # Not a defect of the data: strict mode keeps the same behaviour rather than refusing the file.
    assert len(_parse(path=str(SHAPES / "kto.json"), strict=True).examples[0]) == 2
    warnings = _datasets(tokenizer, path=str(SHAPES / "kto.json")).report.warnings()
    assert any("2 answers labelled undesirable" in w for w in warnings)


def test_preference_data_under_sft_trains_the_chosen_answer_and_says_rejected_is_unused(tokenizer):
    data = _datasets(tokenizer, path=str(SHAPES / "hh_rlhf.jsonl"))
    assert any("3 rejected answers are unused" in w for w in data.report.warnings())
    text = tokenizer.decode(data.train.table.sample(0).input_ids.tolist())
    assert "Trim the stems" in text and "Put them in the sun" not in text


def test_llama_factory_pairs_with_a_sharegpt_prompt_are_preference_not_sharegpt():
    parsed = _parse(path=str(SHAPES / "dpo_sharegpt.json"), format="auto")
    assert parsed.formats == ["preference"] and parsed.reports[0].skipped == {}
    second = parsed.examples[0][1]
    assert [m.role for m in second.messages] == ["system", "user", "assistant"]
    assert second.messages[-1].content == "100 degrees Celsius."
    assert second.rejected[0].content == "It depends on the pot."


def test_an_empty_assistant_turn_mid_conversation_is_not_trained_and_is_counted(tokenizer):
    parsed = _parse(path=str(SHAPES / "missing_turns.json"), format="auto")
    assert parsed.reports[0].flagged == {"empty_turn": 1}
    data = _datasets(tokenizer, path=str(SHAPES / "missing_turns.json"))
    sample = data.train.table.sample(0)
    trained = tokenizer.decode([t for t, label in zip(sample.input_ids, sample.labels) if label != -100])
    assert trained.count("<|im_end|>") == 1 and "Yes, I am here" in trained  # the blank turn's end is not learnt
    with pytest.raises(Exception, match=r"missing_turns.json:2: an assistant turn before the last is blank"):
        _parse(path=str(SHAPES / "missing_turns.json"), strict=True)


def test_long_documents_are_split_into_windows_not_cut(tokenizer, tmp_path):
    words = " ".join(f"word{i}" for i in range(3000))
    (tmp_path / "long.txt").write_text(words + "\n")
    data = _datasets(tokenizer, path=str(tmp_path / "long.txt"), format="text", max_seq_len=128)
    report = data.report.sources[0]
    total = len(tokenizer(words, add_special_tokens=False)["input_ids"])
    assert report.chunked == 1 and report.windows == len(data.train.table) >= total // 128
    assert int(data.train.table.lengths.sum()) >= total  # every token of the document is in some window
    assert report.truncated == 0
    cut = _datasets(tokenizer, path=str(tmp_path / "long.txt"), format="text", max_seq_len=128, text_chunking=False)
    assert len(cut.train.table) == 1 and cut.report.sources[0].truncated == 1


def test_a_json_file_holding_one_record_is_that_record():
    parsed = _parse(path=str(SHAPES / "single_record.json"), format="auto")
    assert parsed.formats == ["chat"] and parsed.reports[0].records == 1
    assert parsed.examples[0][0].messages[-1].content == "Lisbon."


def test_auto_reads_a_users_own_column_names():
    from trainer.config.schema import ColumnsConfig

    parsed = _parse(path=str(SHAPES / "own_columns.jsonl"), format="auto",
                    columns=ColumnsConfig(instruction="question", output="answer"))
    assert parsed.formats == ["alpaca"]
    assert parsed.examples[0][0].messages[-1].content == "Bees make honey."


def test_dolly_is_recognised_by_its_own_field_names():
    parsed = _parse(path=str(FIXTURES / "data" / "dolly.jsonl"), format="auto")
    assert parsed.formats == ["alpaca"]
    user, answer = parsed.examples[0][0].messages
    assert user.context.startswith("The harbour lighthouse") and answer.content == "It opened in 1871."


@pytest.mark.parametrize("name,line,what", [
    ("tools_openai.jsonl", 2, "message 2 of 'messages' has tool calls"),
    ("tools_sharegpt.json", 2, "message 2 of 'conversations' has role 'function_call'"),
])
def test_tool_call_conversations_are_refused_in_one_line(name, line, what, tmp_path):
    result = _data_check(f"data.path={SHAPES / name}", tmp_path=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}:{line}: {what}: tool-use conversations are not supported" in lines[0]


def test_questionable_turn_orders_are_counted_and_refused_under_strict(tmp_path):
    parsed = _parse(path=str(SHAPES / "turn_order.jsonl"), format="auto")
    assert parsed.reports[0].flagged == {"turn_order": 3} and len(parsed.examples[0]) == 4
    result = _data_check(f"data.path={SHAPES / 'turn_order.jsonl'}", "data.strict=true", tmp_path=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (f"trainer: {SHAPES / 'turn_order.jsonl'}:2: it starts with the assistant "
                                     "(expected user and assistant turns taking turns, starting with the user; "
                                     "data.strict=false keeps and counts such records)")
    report = _data_check(f"data.path={SHAPES / 'turn_order.jsonl'}", "train.global_batch_size=1",
                         "train.micro_batch_size=1", tmp_path=tmp_path)
    assert report.returncode == 0, report.stderr
    assert "3 kept with questionable turn order" in report.stdout


def test_data_check_warns_when_many_records_are_truncated(tmp_path):
    records = [{"instruction": f"Repeat {i}.", "output": "many words " * 60} for i in range(20)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(records))
    result = _data_check(f"data.path={path}", "data.max_seq_len=64", "train.global_batch_size=1",
                         "train.micro_batch_size=1", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "were truncated or dropped at max_seq_len=64: raise data.max_seq_len" in result.stdout
