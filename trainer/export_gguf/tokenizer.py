"""A Hugging Face fast tokenizer (tokenizer.json) as llama.cpp's tokenizer metadata.

Two kinds are written, each as the llama.cpp tokenizer that splits text the same way:

* byte-level BPE (Llama 3, Qwen 2) as llama.cpp's `gpt2` vocab: tokens, merges, token types. llama.cpp does not run
  the pre-tokenizer that tokenizer.json describes; it picks one of its own by name (`tokenizer.ggml.pre`), so the
  split pattern is recognised here and named: ByteLevel's own pattern is GPT-2's, and the Split patterns of Llama
  3 and Qwen 2 are llama.cpp's `llama-bpe` and `qwen2`. Any other pattern is refused.
* SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Mixtral, Phi-3, Gemma) as llama.cpp's `llama`
  (SentencePiece) vocab: tokens with scores, where a merged piece's score is minus its merge rank (llama.cpp
  merges the highest-scoring pair first, as the BPE merges apply in rank order), <0xNN> tokens typed as bytes,
  and whether a "▁" word prefix is added (Metaspace's prepend scheme; Gemma adds none). As with llama.cpp's own
  converter for these models, llama.cpp adds that prefix after every special token too, where transformers'
  non-legacy tokenizers (prepend scheme "first": Llama 2, Mistral, Phi-3) add it only at the start of the text:
  "<s>[INST]" is "<s>", "▁[", ... in llama.cpp. Token ids given to llama.cpp directly are unaffected.

Special ids and the chat template come from tokenizer_config.json. Token ids past the tokenizer's own (padding
rows of the embedding) are written as unused tokens.
"""

from __future__ import annotations

import os

from trainer.errors import UserError
from trainer.jsonfile import read_json

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_TAIL = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLIT_PATTERNS = {  # tokenizer.json Split regex -> llama.cpp pre-tokenizer name
    _CONTRACTIONS + r"\p{N}{1,3}" + _TAIL: "llama-bpe",  # Llama 3: digits in groups of up to three
    _CONTRACTIONS + r"\p{N}" + _TAIL: "qwen2",  # Qwen 2 / 2.5: one digit at a time
}


def read_tokenizer(model_dir: str) -> tuple[dict, dict]:
    """(tokenizer.json, how llama.cpp is to split text: {"model": "gpt2", "pre": NAME} or {"model": "llama",
    "add_space_prefix": BOOL}), or a UserError saying why llama.cpp would split differently."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir!r} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer; "
                        "save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    spec = read_json(path)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [step.get("type") for step in steps]
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return spec, {"model": "llama", "add_space_prefix": _sentencepiece_prefix(path, spec, steps)}
    if model.get("type") != "BPE" or "ByteLevel" not in kinds:
        raise UserError(f"{path}: GGUF export writes byte-level BPE and SentencePiece-style BPE (byte fallback) "
                        f"tokenizers; this one is {model.get('type')}/{'+'.join(filter(None, kinds)) or 'no '}"
                        "pre-tokenizer: use llama.cpp's convert_hf_to_gguf.py")
    return spec, {"model": "gpt2", "pre": _pre_tokenizer_name(path, steps)}


def _sentencepiece_prefix(path: str, spec: dict, steps: list[dict]) -> bool:
    """Whether the tokenizer writes a "▁" before the text: Metaspace's prepend scheme, or (Gemma's form, and older
    tokenizer.json files) a normalizer that turns spaces into "▁" with or without a Prepend("▁")."""
    normalizer = spec.get("normalizer") or {}
    norms = normalizer.get("normalizers", [normalizer]) if normalizer else []
    norm_kinds = [step.get("type") for step in norms]
    metaspace = [step for step in steps if step.get("type") == "Metaspace"]
    if metaspace and not norms and len(steps) == 1 and metaspace[0].get("replacement") == "▁" \
            and not metaspace[0].get("split"):
        return metaspace[0].get("prepend_scheme", "always") != "never"
    spaces_to_pieces = any(step.get("type") == "Replace" and step.get("content") == "▁" for step in norms)
    # Gemma's pre-tokenizer splits on " ", which no longer occurs once the normalizer has replaced them.
    splits_only_on_spaces = all(step.get("type") == "Split" and (step.get("pattern") or {}).get("String") == " "
                                for step in steps)
    if spaces_to_pieces and splits_only_on_spaces and set(norm_kinds) <= {"Prepend", "Replace"}:
        return "Prepend" in norm_kinds
    raise UserError(f"{path}: a byte-fallback BPE tokenizer whose text preparation "
                    f"({'+'.join(filter(None, norm_kinds)) or 'no normalizer'}, "
                    f"{'+'.join(filter(None, (step.get('type') for step in steps))) or 'no pre-tokenizer'}) has no "
                    "llama.cpp counterpart: use llama.cpp's convert_hf_to_gguf.py")


def _pre_tokenizer_name(path: str, steps: list[dict]) -> str:
    byte_level = next(step for step in steps if step.get("type") == "ByteLevel")
    if byte_level.get("add_prefix_space"):
        raise UserError(f"{path}: ByteLevel add_prefix_space is true, which llama.cpp's BPE tokenizers do not do")
    splits = [step for step in steps if step.get("type") == "Split"]
    others = [step.get("type") for step in steps if step.get("type") not in ("ByteLevel", "Split")]
    if others:
        raise UserError(f"{path}: pre-tokenizer step {others[0]} has no llama.cpp counterpart: use llama.cpp's "
                        "convert_hf_to_gguf.py")
    if not splits and byte_level.get("use_regex", True):
        return "gpt-2"
    if len(splits) == 1 and not byte_level.get("use_regex", True):
        pattern = (splits[0].get("pattern") or {}).get("Regex")
        if pattern in SPLIT_PATTERNS:
            return SPLIT_PATTERNS[pattern]
    raise UserError(f"{path}: this pre-tokenizer's split pattern is not one llama.cpp knows by name here "
                    f"(GPT-2's, Llama 3's or Qwen 2's): use llama.cpp's convert_hf_to_gguf.py")


def add_tokenizer(writer, model_dir: str, spec: dict, split: dict, vocab_size: int,
                  chat_template: str | None = None) -> None:
    """Tokens, types (and merges or scores), special ids and chat template from tokenizer.json /
    tokenizer_config.json; `chat_template` replaces the tokenizer's own (a run trained with another template)."""
    import gguf

    model = spec["model"]
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if split["model"] == "llama":
        types.update({index: gguf.TokenType.BYTE for index, token in tokens.items() if _is_byte_token(token)})
        if model.get("unk_token") in model["vocab"]:
            types[model["vocab"][model["unk_token"]]] = gguf.TokenType.UNKNOWN
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UserError(f"{model_dir}/tokenizer.json has token id {max(tokens)}, past config.json vocab_size "
                        f"{vocab_size}: the embedding has no row for it")
    writer.add_tokenizer_model(split["model"])
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    if split["model"] == "gpt2":
        writer.add_tokenizer_pre(split["pre"])
        writer.add_token_merges(merges)
    else:
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(_merge_scores(merges, model["vocab"], vocab_size))
        writer.add_add_space_prefix(split["add_space_prefix"])

    tok_config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
    ids = {token: index for index, token in tokens.items()}
    for key, add in (("bos_token", writer.add_bos_token_id), ("eos_token", writer.add_eos_token_id),
                     ("unk_token", writer.add_unk_token_id), ("pad_token", writer.add_pad_token_id)):
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token in ids:
            add(ids[token])
    # Our data encoding puts BOS first whenever the tokenizer has one (trainer/data/encode.py).
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", _content(tok_config.get("bos_token")) in ids)))
    template = chat_template or _chat_template(model_dir, tok_config)
    if template:
        writer.add_chat_template(template)


def _is_byte_token(token: str) -> bool:
    return len(token) == 6 and token.startswith("<0x") and token.endswith(">")


def _merge_scores(merges: list[str], vocab: dict[str, int], vocab_size: int) -> list[float]:
    """Minus the rank of the merge that makes each piece (the first merge that makes it); 0 for pieces no merge
    makes (characters, bytes, special tokens), which llama.cpp never forms by merging."""
    scores = [0.0] * vocab_size
    seen = set()
    for rank, merge in enumerate(merges):
        piece = merge.replace(" ", "", 1)
        index = vocab.get(piece)
        if index is not None and index not in seen:
            seen.add(index)
            scores[index] = -float(rank + 1)
    return scores


def _content(token):
    return token.get("content") if isinstance(token, dict) else token


def _chat_template(model_dir: str, tok_config: dict) -> str | None:
    path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path) as fh:
            return fh.read()
    template = tok_config.get("chat_template")
    return template if isinstance(template, str) and template else None


def _read_json(path: str) -> dict:
    return read_json(path) if os.path.isfile(path) else {}
