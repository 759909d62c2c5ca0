"""llama.cpp is the judge of our GGUF export, family by family (trainer/replicas.py).

A LoRA adapter is first trained on each replica until it has learnt one chat answer by heart: random weights give
near-uniform logits, whose argmax a rounding error can flip, while a learnt answer is decided by clear margins.
Then llama.cpp (through llama-cpp-python, `pip install 'trainer[gguf-test]'`) runs

* the merged model as one GGUF, f16 and q8_0 (merged by `trainer.adapters.merge_adapter`, as `--to gguf-model`
  does), and
* the base model's f16 GGUF with our GGUF LoRA adapter on top (`write_lora_adapter`),

and its greedy continuation of the chat prompt, token by token, is compared with transformers' on the base model
with the PEFT adapter (fp32). f16 must give the same tokens; q8_0's agreement is measured and printed (run with -s)
and must not fall below Q8_0_MIN_AGREEMENT. The prompt's logits are compared too, and llama.cpp's tokenizer must
split text into the same ids as transformers': plain text (with characters outside the vocabulary, which
SentencePiece-style tokenizers write as <0xNN> bytes) exactly, and the chat prompt exactly except for the one
documented difference of transformers' non-legacy SentencePiece tokenizers (trainer/export_gguf/tokenizer.py).
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("gguf")
try:
    import llama_cpp
except ImportError:  # CI (`make test`) installs it, so there its absence is a failure, never a quiet skip
    if os.environ.get("CI"):
        raise
    pytest.skip("llama-cpp-python is not installed: `make install-test` (or pip install 'trainer[gguf-test]')",
                allow_module_level=True)

from trainer.replicas import FAMILIES, build_replica  # noqa: E402

NEW_TOKENS = 16
TRAIN_STEPS = 80
Q8_0_MIN_AGREEMENT = 8  # leading new tokens that q8_0 must reproduce (measured: see the printed figures)
CONVERSATION = [{"role": "user", "content": "Which creature lives in the cave?"},
                {"role": "assistant", "content": "The glowing one with six legs: it sleeps by day, hums at night "
                                                 "and eats the moss that grows on the cold wet stones."}]


def _train_lora(base_dir, adapter_dir, prompt_and_answer_ids):
    """LoRA (all-linear, resolved as `trainer train peft=lora` does: nn.Linear layers only, so not Mixtral's fused
    experts) on one chat turn until it is learnt, with a large step."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from trainer.adapters import resolve_target_modules

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    targets = resolve_target_modules(model, "all-linear")
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.tensor([prompt_and_answer_ids])
    model.train()
    for _ in range(TRAIN_STEPS):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(adapter_dir)


def _greedy_transformers(model, prompt_ids):
    ids = list(prompt_ids)
    with torch.no_grad():
        prompt_logits = model(input_ids=torch.tensor([ids])).logits[0].numpy()
        for _ in range(NEW_TOKENS):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return prompt_logits, ids[len(prompt_ids):]


PLAIN_TEXT = "Which creature lives in the cave?  It hums at 42 degrees, naïvely; ünïcödé → ok"


def _greedy_llama_cpp(model_path, prompt_ids, lora_path=None, prompt_text=None):
    """(prompt logits, greedy new tokens, llama.cpp's ids for prompt_text and for PLAIN_TEXT) from llama.cpp; the
    argmax is taken here, so that no sampler or end-of-turn stop intervenes."""
    import numpy as np

    llm = llama_cpp.Llama(model_path=str(model_path), lora_path=str(lora_path) if lora_path else None, n_ctx=64,
                          n_batch=64, logits_all=True, n_threads=2, verbose=False)
    try:
        llm.eval(list(prompt_ids))
        prompt_logits = np.array(llm.scores[: len(prompt_ids)])
        new = []
        for _ in range(NEW_TOKENS):
            new.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            llm.eval([new[-1]])
        tokenized = None
        if prompt_text:
            tokenized = (llm.tokenize(prompt_text.encode(), add_bos=False, special=True),
                         llm.tokenize(PLAIN_TEXT.encode(), add_bos=False, special=False))
    finally:
        llm.close()
    return prompt_logits, new, tokenized


def _as_llama_cpp_splits(tokenizer, text: str) -> list[int]:
    """transformers' ids for TEXT, with the "▁" word prefix after special tokens that llama.cpp writes (as the
    original SentencePiece tokenizers do) where a non-legacy transformers tokenizer (Metaspace prepend scheme
    "first": Llama 2, Mistral, Phi-3) writes it only at the start of the text."""
    from tokenizers import Tokenizer, pre_tokenizers

    backend = tokenizer.backend_tokenizer
    pre = backend.pre_tokenizer
    if isinstance(pre, pre_tokenizers.Metaspace) and pre.prepend_scheme == "first":
        backend = Tokenizer.from_str(backend.to_str())
        backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="always", split=False)
    return backend.encode(text, add_special_tokens=False).ids


def _agreement(got, expected) -> int:
    """How many leading tokens agree."""
    count = 0
    for a, b in zip(got, expected):
        if a != b:
            break
        count += 1
    return count


@pytest.mark.slow  # every family, in `make test`: each GGUF cell of docs/models.md's table is a test CI runs
@pytest.mark.parametrize("family", list(FAMILIES))
def test_llama_cpp_continues_like_transformers(family, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.adapters import merge_adapter
    from trainer.export_gguf import write_lora_adapter, write_model

    base, adapter, merged = tmp_path / "base", tmp_path / "adapter", tmp_path / "merged"
    build_replica(family, base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompt_text = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False).input_ids
    _train_lora(base, adapter, tokenizer(full_text, add_special_tokens=False).input_ids)

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
    ref_logits, ref_tokens = _greedy_transformers(reference.eval(), prompt_ids)
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)(
            input_ids=torch.tensor([prompt_ids])).logits[0].numpy()

    merge_adapter(str(adapter), str(merged), base_path=str(base), dtype="fp32")
    merged_f16 = write_model(str(merged), str(tmp_path / "merged-f16.gguf"), dtype="f16")
    merged_q8 = write_model(str(merged), str(tmp_path / "merged-q8_0.gguf"), dtype="q8_0")
    base_f16 = write_model(str(base), str(tmp_path / "base-f16.gguf"), dtype="f16")
    lora = write_lora_adapter(str(adapter), str(tmp_path / "lora.gguf"), base_dir=str(base), dtype="f16")

    f16_logits, f16_tokens, tokenized = _greedy_llama_cpp(merged_f16, prompt_ids, prompt_text=prompt_text)
    assert tokenized[1] == tokenizer(PLAIN_TEXT, add_special_tokens=False).input_ids, "plain text splits alike"
    assert tokenized[0] == _as_llama_cpp_splits(tokenizer, prompt_text), "the chat prompt splits alike"
    lora_logits, lora_tokens, _ = _greedy_llama_cpp(base_f16, prompt_ids, lora_path=lora)
    q8_logits, q8_tokens, _ = _greedy_llama_cpp(merged_q8, prompt_ids)

    scale = float(abs(ref_logits).max())
    errors = {name: float(abs(logits - ref_logits).max()) / scale
              for name, logits in (("f16", f16_logits), ("lora", lora_logits), ("q8_0", q8_logits))}
    adapter_effect = float(abs(base_logits - ref_logits).max()) / scale
    agreement = {"f16": _agreement(f16_tokens, ref_tokens), "lora": _agreement(lora_tokens, ref_tokens),
                 "q8_0": _agreement(q8_tokens, ref_tokens)}
    print(f"\n{family}: greedy agreement of {NEW_TOKENS} new tokens {agreement}; prompt logits max error / max "
          f"|logit| {({k: round(v, 4) for k, v in errors.items()})}; adapter effect {adapter_effect:.3f}")
    assert f16_tokens == ref_tokens, (family, "merged f16")
    assert lora_tokens == ref_tokens, (family, "base f16 + LoRA adapter")
    assert agreement["q8_0"] >= Q8_0_MIN_AGREEMENT, (family, q8_tokens, ref_tokens)
    # The logits themselves: f16 rounding is far below what the adapter changes; q8_0 within a few percent.
    assert errors["f16"] < 0.02 and errors["lora"] < 0.02, errors
    assert errors["q8_0"] < 0.1, errors
    assert adapter_effect > 5 * max(errors["f16"], errors["lora"]), "the adapter must visibly change the logits"
