"""Formats, templates and label masks on the project's own fixtures, with the real embedded tokenizer."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, REPO

DATA = FIXTURES / "data"
TOKENIZER = REPO / "trainer" / "assets" / "tiny-llama"


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.config.schema import ModelConfig
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(TOKENIZER)))


def _data_config(**overrides):
    from trainer.config.schema import DataConfig

    return DataConfig(**{"val_ratio": 0.0, "template": "chatml", "max_seq_len": 256, **overrides})


def _parse(**overrides):
    from trainer.data import parse_sources

    return parse_sources(_data_config(**overrides))


def _datasets(tokenizer, **overrides):
    from trainer.data import prepare_datasets

    return prepare_datasets(_data_config(**overrides), tokenizer, seed=0)


def _trained_texts(tokenizer, sample) -> list[str]:
    """The decoded runs of consecutive trained tokens, in order."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != -100:
            current.append(int(token))
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    if current:
        runs.append(tokenizer.decode(current, skip_special_tokens=False))
    return runs


@pytest.mark.parametrize("name,fmt,columns,records,skipped", [
    ("alpaca.json", "alpaca", {}, 12, {"empty": 1}),
    ("dolly.jsonl", "alpaca", {"input": "context", "output": "response"}, 6, {}),
    ("chat.jsonl", "chat", {}, 5, {"ends_on_user": 1}),
    ("sharegpt.json", "sharegpt", {}, 3, {}),
    ("text.txt", "text", {}, 3, {}),
    ("completion.jsonl", "completion", {}, 3, {}),
    ("preference.json", "preference", {}, 3, {"identical_pair": 1}),
    ("bom_crlf.jsonl", "alpaca", {}, 3, {}),
    ("wrapped.json", "alpaca", {}, 2, {}),
    ("alpaca.csv", "alpaca", {}, 3, {}),
])
def test_every_format_parses_its_fixture_with_the_right_counts(name, fmt, columns, records, skipped):
    from trainer.config.schema import ColumnsConfig

    parsed = _parse(path=str(DATA / name), format=fmt, columns=ColumnsConfig(**columns))
    report = parsed.reports[0]
    assert (report.records, report.skipped) == (records, skipped)
    assert len(parsed.examples[0]) == records - sum(skipped.values())


def test_records_keep_their_lines_through_bom_crlf_and_blank_lines():
    parsed = _parse(path=str(DATA / "bom_crlf.jsonl"))
    assert [e.line for e in parsed.examples[0]] == [1, 3, 5]
    assert parsed.examples[0][0].messages[0].content == "First, after a BOM."


def test_auto_format_detects_each_fixture():
    for name, fmt in [("alpaca.json", "alpaca"), ("chat.jsonl", "chat"), ("sharegpt.json", "sharegpt"),
                      ("completion.jsonl", "completion"), ("preference.json", "preference"), ("text.txt", "text")]:
        assert _parse(path=str(DATA / name), format="auto").formats == [fmt], name


def test_dolly_columns_map_onto_alpaca_fields():
    from trainer.config.schema import ColumnsConfig

    parsed = _parse(path=str(DATA / "dolly.jsonl"), columns=ColumnsConfig(input="context", output="response"))
    user, answer = parsed.examples[0][0].messages
    assert user.content == "When did the lighthouse open?" and user.context.startswith("The harbour lighthouse")
    assert answer.content == "It opened in 1871."


def test_alpaca_trains_on_the_answer_and_eos_only(tokenizer):
    data = _datasets(tokenizer, path=str(DATA / "alpaca.json"), template="alpaca")
    sample = data.train.table.sample(1)  # "Add the two numbers." with an input
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    assert text == ("<s>### Instruction:\nAdd the two numbers.\n\n### Input:\n17 and 25\n\n### Response:\n"
                    "17 + 25 = 42.</s>")
    assert _trained_texts(tokenizer, sample) == ["17 + 25 = 42.</s>"]
    assert sample.num_label_tokens == len(tokenizer("17 + 25 = 42.", add_special_tokens=False)["input_ids"]) + 1


@pytest.mark.parametrize("template,end", [("chatml", "<|im_end|>\n</s>"), ("llama-3", "<|eot_id|></s>")])
def test_every_assistant_turn_of_a_chat_is_trained_and_nothing_else(tokenizer, template, end):
    data = _datasets(tokenizer, path=str(DATA / "chat.jsonl"), format="chat", template=template)
    two_turns = data.train.table.sample(1)
    trained = _trained_texts(tokenizer, two_turns)
    marker = "<|im_end|>\n" if template == "chatml" else "<|eot_id|>"
    assert trained == [f"Orange.{marker}", f"Blue.{end}"]
    weight_zero = data.train.table.sample(2)  # the first answer has weight 0: only the correction is trained
    assert _trained_texts(tokenizer, weight_zero) == [f"Hello!{end}"]


def test_the_tokenizers_own_template_is_used_and_masked_by_turn(tokenizer):
    from trainer.data.templates import TokenizerTemplate, build_template

    assert isinstance(build_template("auto", tokenizer, ["sharegpt"]), TokenizerTemplate)
    data = _datasets(tokenizer, path=str(DATA / "sharegpt.json"), format="sharegpt", template="auto")
    assert data.report.template == "the tokenizer's own chat template"
    sample = data.train.table.sample(0)
    turns = [{"role": "user", "content": "Who are you?"}, {"role": "assistant", "content": "A small test assistant."},
             {"role": "user", "content": "What can you do?"},
             {"role": "assistant", "content": "Answer short questions."}]
    rendered = tokenizer.apply_chat_template(turns, tokenize=False)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == f"<s>{rendered}</s>"
    assert _trained_texts(tokenizer, sample) == ["A small test assistant.<|im_end|>\n",
                                                 "Answer short questions.<|im_end|>\n</s>"]


def test_auto_template_falls_back_to_alpaca_or_chatml_without_a_tokenizer_template(tokenizer):
    from trainer.data.templates import AlpacaTemplate, ChatMLTemplate, build_template
    from trainer.errors import ConfigError

    class Plain:
        chat_template = None
        eos_token = "</s>"

    assert isinstance(build_template("auto", Plain(), ["alpaca"]), AlpacaTemplate)
    assert isinstance(build_template("auto", Plain(), ["alpaca", "chat"]), ChatMLTemplate)
    assert build_template("auto", Plain(), ["text", "completion"]) is None
    with pytest.raises(ConfigError, match="data.template"):
        build_template("tokenizer", Plain(), ["chat"])


def test_train_on_inputs_trains_every_token_but_the_first(tokenizer):
    data = _datasets(tokenizer, path=str(DATA / "chat.jsonl"), format="chat", train_on_inputs=True)
    sample = data.train.table.sample(0)
    assert sample.num_label_tokens == len(sample.input_ids) - 1


def test_text_and_completion_formats_use_no_template(tokenizer):
    text = _datasets(tokenizer, path=str(DATA / "text.txt"), format="text")
    first = text.train.table.sample(0)
    assert tokenizer.decode(first.input_ids, skip_special_tokens=False) == (
        "<s>The quorble is a blue bird that nests in reeds.\nIt sings at dawn.</s>")
    completion = _datasets(tokenizer, path=str(DATA / "completion.jsonl"), format="completion")
    assert _trained_texts(tokenizer, completion.train.table.sample(0)) == [" Paris.</s>"]
    assert completion.report.template.startswith("none")


def test_truncation_truncates_or_drops_and_counts(tokenizer):
    truncated = _datasets(tokenizer, path=str(DATA / "alpaca.json"), template="alpaca", max_seq_len=48)
    assert truncated.train_stats.truncated > 0 and max(truncated.train.table.lengths) == 48
    dropped = _datasets(tokenizer, path=str(DATA / "alpaca.json"), template="alpaca", max_seq_len=48,
                        truncation="drop")
    # Too long: truncated ones, and the one whose prompt alone fills max_seq_len (nothing left to train on).
    too_long = truncated.train_stats.truncated + truncated.train_stats.dropped_no_labels
    assert truncated.train_stats.dropped_no_labels == 1
    assert dropped.train_stats.dropped_too_long == too_long
    assert len(dropped.train) == len(truncated.train) - truncated.train_stats.truncated
    assert dropped.report.sources[0].dropped_too_long == dropped.train_stats.dropped_too_long


def test_preference_pairs_split_a_shared_prompt_from_the_two_answers():
    parsed = _parse(path=str(DATA / "preference.json"), format="preference")
    strings, conversations = parsed.examples[0]
    assert [m.role for m in strings.messages] == ["user", "assistant"]
    assert strings.rejected[0].content == "Freeze it whole in the bag."
    assert conversations.messages[0].content == "My bike chain squeaks."
    assert [m.content for m in conversations.messages[1:] + conversations.rejected] == [
        "Clean it, then apply a little chain oil.", "Ride faster."]


def test_a_template_that_does_not_render_turn_by_turn_is_an_error():
    from trainer.data.formats import Example, Message
    from trainer.data.templates import render_example
    from trainer.errors import DataError

    class Reordering:
        name = "reordering"
        description = "test"

        def render(self, messages, add_generation_prompt):  # puts the newest turn first
            return "".join(f"{m.role}:{m.content}\n" for m in reversed(messages)) + ("assistant:" if
                                                                                      add_generation_prompt else "")

    example = Example((Message("user", "a"), Message("assistant", "b"), Message("user", "c"),
                       Message("assistant", "d")), (), "f.jsonl", 7)
    with pytest.raises(DataError, match=r"f.jsonl:7: .*turn by turn"):
        render_example(example, Reordering())


def test_unknown_template_name_fails_at_config_time():
    from trainer.errors import ConfigError

    with pytest.raises(ConfigError, match="template"):
        _data_config(path="x.jsonl", template="vicuna")
