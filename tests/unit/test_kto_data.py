"""KTO's data (trainer/data/pairs.py): answers labelled desirable or not from KTO files (messages or prompt/completion
with `label`) and from preference pairs (chosen desirable, rejected undesirable), each beside the same prompt with
another answer of its own split for the KL estimate; supervised fine-tuning still never trains the undesirable."""

from __future__ import annotations

import pytest

from tests.conftest import FIXTURES, REPO

SHAPES = FIXTURES / "data" / "real-shapes"


@pytest.fixture(scope="module")
def tokenizer():
    from trainer.config.schema import ModelConfig
    from trainer.model import load_tokenizer

    return load_tokenizer(ModelConfig(path=str(REPO / "trainer" / "assets" / "tiny-llama")))


def _kto(tokenizer, **overrides):
    from trainer.config.schema import DataConfig
    from trainer.data import prepare_datasets

    cfg = DataConfig(**{"val_ratio": 0.0, "template": "chatml", "max_seq_len": 256, "cache": False, **overrides})
    return prepare_datasets(cfg, tokenizer, seed=0, pairs="unpaired")


def _text(tokenizer, sample) -> str:
    return tokenizer.decode(sample.input_ids.tolist())


def _trained(tokenizer, sample, trained: bool = True) -> str:
    """The sample's trained tokens (its answer), or the untrained ones (its prompt), as text."""
    return tokenizer.decode([t for t, label in zip(sample.input_ids.tolist(), sample.labels.tolist())
                             if (label != -100) == trained], skip_special_tokens=True)


def test_a_kto_file_keeps_both_labels_and_pairs_each_answer_with_another_records_answer(tokenizer):
    data = _kto(tokenizer, path=str(SHAPES / "kto.json"))
    items = [data.train[i] for i in range(len(data.train))]
    assert data.report.desirable == 2 and data.report.undesirable == 2
    assert "KTO answers (2 desirable, 2 undesirable)" in data.report.summary_line()
    by_answer = {_trained(tokenizer, item.chosen).strip(): item for item in items}
    assert len(by_answer) == 4
    labels = {answer.split()[0]: item.desirable for answer, item in by_answer.items()}
    assert labels == {"Blue": True, "Green,": False, "A": True, "Six,": False}
    mismatched = sorted(_trained(tokenizer, item.rejected).strip() for item in items)
    assert mismatched == sorted(by_answer)  # every answer is some other item's mismatched answer, once
    for answer, item in by_answer.items():
        assert _trained(tokenizer, item.rejected).strip() != answer
        prompt = _text(tokenizer, item.chosen).split(answer)[0]
        assert _text(tokenizer, item.rejected).startswith(prompt)  # the same prompt, another answer


def test_the_mismatch_is_fixed_by_the_seed(tokenizer):
    def mismatch(seed):
        from trainer.config.schema import DataConfig
        from trainer.data import prepare_datasets

        cfg = DataConfig(path=str(SHAPES / "kto.json"), val_ratio=0.0, template="chatml", max_seq_len=256,
                         cache=False, shuffle=False)
        data = prepare_datasets(cfg, tokenizer, seed=seed, pairs="unpaired")
        return [_trained(tokenizer, data.train[i].rejected) for i in range(len(data.train))]

    assert mismatch(0) == mismatch(0)
    assert any(mismatch(0) != mismatch(seed) for seed in (1, 2, 3))


def test_prompt_completion_records_with_labels_are_kto_items(tokenizer):
    data = _kto(tokenizer, path=str(SHAPES / "kto_completion.jsonl"))
    assert (data.report.desirable, data.report.undesirable) == (3, 2)
    for i in range(len(data.train)):
        item = data.train[i]
        answer, other = _trained(tokenizer, item.chosen), _trained(tokenizer, item.rejected)
        assert answer.strip() in {"Blue.", "Green, maybe purple.", "Eight.", "Six.", "Honey."} and other != answer
        prompt = _trained(tokenizer, item.chosen, trained=False)  # the text prompt, no template
        assert prompt.startswith("Q: ") and _trained(tokenizer, item.rejected, trained=False) == prompt


def test_preference_pairs_give_a_desirable_and_an_undesirable_answer_each(tokenizer):
    data = _kto(tokenizer, path=str(SHAPES / "hh_rlhf.jsonl"))
    assert data.report.desirable == data.report.undesirable == 3
    answers = {_trained(tokenizer, data.train[i].chosen).strip(): data.train[i].desirable
               for i in range(len(data.train))}
    assert any("Trim the stems" in a and label for a, label in answers.items())
    assert any("Put them in the sun" in a and not label for a, label in answers.items())


def test_data_without_labels_or_pairs_is_refused_naming_the_file(tokenizer):
    from trainer.errors import DataError

    with pytest.raises(DataError, match="objective.name=kto") as error:
        _kto(tokenizer, path=str(SHAPES / "turn_order.jsonl"))
    assert "turn_order.jsonl" in str(error.value)


def test_supervised_fine_tuning_still_leaves_undesirable_answers_out(tokenizer):
    from trainer.config.schema import DataConfig
    from trainer.data import prepare_datasets

    cfg = DataConfig(path=str(SHAPES / "kto_completion.jsonl"), val_ratio=0.0, max_seq_len=256, cache=False)
    data = prepare_datasets(cfg, tokenizer, seed=0)
    assert data.report.sources[0].skipped == {"undesirable": 2}
    trained = " ".join(_trained(tokenizer, data.train.table.sample(i)) for i in range(len(data.train.table)))
    assert "Six" not in trained and "purple" not in trained and "Honey" in trained
