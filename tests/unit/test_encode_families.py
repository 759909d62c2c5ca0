"""A conversation is trained on the tokens the model will see when it is served: the whole rendered text tokenised
at once, as generation tokenises it, with the loss on the answer's tokens only -- for every kind of tokenizer the
families use (SentencePiece-style ones write a "▁" word prefix at the start of any text they are given, so an
answer tokenised on its own after "<|assistant|>\\n" would begin with a token the model never sees there)."""

from __future__ import annotations

import pytest

from trainer.data.formats import Example, Message

# phi-3: Metaspace "first" after a newline; mixtral: legacy "always"; gemma-2: no prefix; llama-3.1: byte-level.
FAMILIES = ("phi-3", "mixtral", "gemma-2", "llama-3.1", "llama-2")
ANSWER = "It eats berries, 42 of them -- naïvely!"


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from trainer.replicas import _train_tokenizer

    return {family: _train_tokenizer(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trained_tokens_are_the_answer_as_the_whole_conversation_splits_it(family, tokenizers):
    from trainer.data.encode import encode_samples
    from trainer.data.templates import build_template, render_example

    tokenizer = tokenizers[family]
    example = Example((Message("user", "What does the Glimmerfox eat?"), Message("assistant", ANSWER)), (),
                      "chat.jsonl", 1)
    template = build_template("auto", tokenizer, ["chat"])
    sample = render_example(example, template, tokenizer.bos_token)
    table, kept, _, _ = encode_samples([sample], tokenizer, max_seq_len=256, train_on_inputs=False)
    assert kept == [0]
    encoded = table.sample(0)
    ids, labels = list(encoded.input_ids), list(encoded.labels)

    text = "".join(segment for segment, _ in sample.segments)
    whole = tokenizer(text, add_special_tokens=False).input_ids
    starts_with_bos = tokenizer.bos_token_id is not None and whole[:1] != [tokenizer.bos_token_id]
    expected = ([tokenizer.bos_token_id] if starts_with_bos else []) + whole
    if tokenizer.eos_token_id not in whole[-3:]:
        expected.append(tokenizer.eos_token_id)
    assert ids == expected, (tokenizer.convert_ids_to_tokens(ids), tokenizer.convert_ids_to_tokens(expected))

    trained = tokenizer.decode([i for i, label in zip(ids, labels) if label != -100], skip_special_tokens=True)
    assert trained.strip() == ANSWER
    prompt_ids = [i for i, label in zip(ids, labels) if label == -100]
    assert "Glimmerfox" in tokenizer.decode(prompt_ids) and "berries" not in tokenizer.decode(prompt_ids)
