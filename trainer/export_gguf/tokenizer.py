"""A Hugging Face fast tokenizer (tokenizer.json) as llama.cpp's tokenizer metadata.

Byte-level BPE tokenizers are written as llama.cpp's `gpt2` vocab: tokens, merges, token types, the special ids and
the chat template. llama.cpp does not run the pre-tokenizer that tokenizer.json describes; it picks one of its own
by name (`tokenizer.ggml.pre`), so the split pattern is recognised here and named: ByteLevel's own pattern is
GPT-2's, and the Split patterns of Llama 3 and Qwen 2 are llama.cpp's `llama-bpe` and `qwen2`. Any other pattern,
and SentencePiece-style tokenizers (Metaspace / byte fallback: Llama 2, Mistral and Gemma's real tokenizers), are
refused with a pointer to llama.cpp's converter rather than written with a tokenizer that splits text differently.
Token ids past the tokenizer's own (padding rows of the embedding) are written as unused tokens.
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


def read_tokenizer(model_dir: str) -> tuple[dict, str]:
    """(tokenizer.json, llama.cpp pre-tokenizer name), or a UserError saying why llama.cpp would split differently."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir!r} has no tokenizer.json: GGUF export needs a fast (tokenizers) tokenizer; "
                        "save one with AutoTokenizer.from_pretrained(...).save_pretrained(dir)")
    spec = read_json(path)
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre else []
    kinds = [step.get("type") for step in steps]
    if model.get("type") != "BPE" or "ByteLevel" not in kinds or model.get("byte_fallback"):
        raise UserError(f"{path}: GGUF export writes byte-level BPE tokenizers only; this one is "
                        f"{model.get('type')}/{'+'.join(filter(None, kinds)) or 'no pre-tokenizer'}"
                        f"{' with byte fallback' if model.get('byte_fallback') else ''} (SentencePiece-style): use "
                        "llama.cpp's convert_hf_to_gguf.py")
    return spec, _pre_tokenizer_name(path, steps)


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


def add_tokenizer(writer, model_dir: str, spec: dict, pre_name: str, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and chat template from tokenizer.json / tokenizer_config.json."""
    import gguf

    model = spec["model"]
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    if max(tokens) >= vocab_size:
        raise UserError(f"{model_dir}/tokenizer.json has token id {max(tokens)}, past config.json vocab_size "
                        f"{vocab_size}: the embedding has no row for it")
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_name)
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(vocab_size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(vocab_size)])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])])

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
    template = _chat_template(model_dir, tok_config)
    if template:
        writer.add_chat_template(template)


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
