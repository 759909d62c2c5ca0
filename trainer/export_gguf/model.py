"""A Hugging Face Llama-family model dir (e.g. a merged fine-tune) as one GGUF file llama.cpp runs directly.

Weights: 2-D matrices in f16, q8_0 (32-weight blocks with one f16 scale each, via gguf's own quantiser; a matrix
whose rows do not split into 32-weight blocks stays f16) or f32; norms always f32, as llama.cpp expects.
Tokenizer: byte-level BPE tokenizers (tokenizer.json with a ByteLevel pre-tokenizer) as llama.cpp's `gpt2` vocab
with the `gpt-2` pre-tokenizer; token ids past the tokenizer's own (padding rows of the embedding) are written as
unused tokens. Other tokenizer kinds (SentencePiece) are refused with a pointer to llama.cpp's converter.
"""

from __future__ import annotations

import os

from trainer.errors import UserError
from trainer.export_gguf.layout import (
    gguf_arch,
    gguf_name,
    head_dim,
    interleave_rotary_rows,
    read_hf_config,
    rope_parameters,
    rotary_heads,
    tensor_name_map,
)
from trainer.jsonfile import read_json

DTYPES = ("f16", "q8_0", "f32")
Q8_BLOCK = 32


def _iter_weights(model_dir: str):
    """(name, fp32 numpy array) for every tensor of the checkpoint, one at a time (bf16 needs torch to read)."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{model_dir!r} holds no *.safetensors weights")
    for file in files:
        with safe_open(os.path.join(model_dir, file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _add_hyperparameters(writer, config: dict, name: str, file_type: int) -> None:
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type)
    writer.add_context_length(int(config.get("max_position_embeddings", 2048)))
    writer.add_embedding_length(int(config["hidden_size"]))
    writer.add_block_count(int(config["num_hidden_layers"]))
    writer.add_feed_forward_length(int(config["intermediate_size"]))
    writer.add_head_count(int(config["num_attention_heads"]))
    writer.add_head_count_kv(int(config.get("num_key_value_heads") or config["num_attention_heads"]))
    dim = head_dim(config)
    writer.add_rope_dimension_count(dim)
    if dim * int(config["num_attention_heads"]) != int(config["hidden_size"]):
        writer.add_key_length(dim)  # llama.cpp assumes hidden_size / heads unless told
        writer.add_value_length(dim)
    writer.add_rope_freq_base(float(rope_parameters(config)["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-5)))
    writer.add_vocab_size(int(config["vocab_size"]))


def _add_tokenizer(writer, model_dir: str, vocab_size: int) -> None:
    """Tokens, types, merges, special ids and chat template from tokenizer.json / tokenizer_config.json."""
    import gguf

    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise UserError(f"{model_dir!r} has no tokenizer.json (a fast tokenizer is needed for GGUF export)")
    spec = read_json(path)
    model, pre = spec.get("model", {}), spec.get("pre_tokenizer") or {}
    pre_types = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if model.get("type") != "BPE" or "ByteLevel" not in pre_types:
        raise UserError("GGUF export writes byte-level BPE tokenizers only; this one is "
                        f"{model.get('type')}/{'+'.join(filter(None, pre_types)) or 'none'}: use llama.cpp's "
                        "convert_hf_to_gguf.py")
    tokens: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in tokens}
    for added in spec.get("added_tokens", []):
        tokens[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(tokens) + 1)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list([tokens.get(i, f"[PAD{i}]") for i in range(size)])
    writer.add_token_types([types.get(i, gguf.TokenType.UNUSED) for i in range(size)])
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
    writer.add_add_bos_token(bool(tok_config.get("add_bos_token", tok_config.get("bos_token") in ids)))
    template_path = os.path.join(model_dir, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path) as fh:
            template = fh.read()
    else:
        template = tok_config.get("chat_template")
    if isinstance(template, str) and template:
        writer.add_chat_template(template)


def _read_json(path: str) -> dict:
    return read_json(path) if os.path.isfile(path) else {}


def _encode(array, dtype: str):
    """(data, raw_dtype) for the writer: norms and vectors f32, matrices in `dtype`."""
    import gguf
    import numpy as np

    if array.ndim < 2 or dtype == "f32":
        return np.ascontiguousarray(array, dtype=np.float32), None
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        kind = gguf.GGMLQuantizationType.Q8_0
        return gguf.quants.quantize(np.ascontiguousarray(array, dtype=np.float32), kind), kind
    return np.ascontiguousarray(array, dtype=np.float16), None


def write_model(model_dir: str, out_path: str, dtype: str = "f16") -> str:
    """Write the model in `model_dir` as a GGUF file at `out_path` (f16, q8_0 or f32 matrices)."""
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"GGUF model dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = read_hf_config(model_dir)
    names = tensor_name_map(config)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    writer = gguf.GGUFWriter(out_path, gguf_arch(config))
    _add_hyperparameters(writer, config, os.path.basename(os.path.abspath(model_dir)), int(file_type))
    if dtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_tokenizer(writer, model_dir, int(config["vocab_size"]))
    tied = bool(config.get("tie_word_embeddings", False))
    for name, array in _iter_weights(model_dir):
        if name.endswith("rotary_emb.inv_freq") or (tied and name == "lm_head.weight"):
            continue  # llama.cpp computes rotary frequencies itself; a tied head reuses token_embd
        module, _, suffix = name.rpartition(".")
        heads = rotary_heads(config, module)
        if heads is not None:
            array = interleave_rotary_rows(array, heads)
        data, raw_dtype = _encode(array, dtype)
        writer.add_tensor(f"{gguf_name(names, module)}.{suffix}", data, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out_path
