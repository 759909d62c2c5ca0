"""A Hugging Face model dir (e.g. a merged fine-tune) of any family in arch.py as one GGUF file llama.cpp runs.

Weights: 2-D and 3-D (stacked experts) matrices in f16, q8_0 (32-weight blocks with one f16 scale each, via gguf's
own quantiser; a matrix whose rows do not split into 32-weight blocks stays f16) or f32; norms, biases and rope
factors always f32, as llama.cpp expects. Tokenizer: tokenizer.py. Everything that can be refused is checked
before writing starts, and the file is written under a temporary name and renamed when complete, so a failed
export leaves no partial .gguf behind.
"""

from __future__ import annotations

import contextlib
import os

from trainer.errors import UserError
from trainer.export_gguf.arch import Family, add_family_metadata, family_for
from trainer.export_gguf.layout import head_dim, read_hf_config, rope_parameters
from trainer.export_gguf.tensors import iter_gguf_tensors
from trainer.export_gguf.tokenizer import add_tokenizer, read_tokenizer

DTYPES = ("f16", "q8_0", "f32")
Q8_BLOCK = 32


def _iter_weights(model_dir: str):
    """(name, fp32 numpy array) for every tensor of the checkpoint, one at a time (bf16 needs torch to read).
    The files are listed now, so that a dir without weights is refused before anything is written."""
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise UserError(f"{model_dir!r} holds no *.safetensors weights")
    return _read_weights(model_dir, files)


def _read_weights(model_dir: str, files: list[str]):
    from safetensors import safe_open

    for file in files:
        with safe_open(os.path.join(model_dir, file), framework="pt") as handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name).float().numpy()


def _add_hyperparameters(writer, config: dict, family: Family, name: str, file_type: int) -> None:
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
    add_family_metadata(writer, config, family)


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


def write_model(model_dir: str, out_path: str, dtype: str = "f16", chat_template: str | None = None) -> str:
    """Write the model in `model_dir` as a GGUF file at `out_path` (f16, q8_0 or f32 matrices); `chat_template`
    (Jinja) replaces the tokenizer's own, for a model whose adapters were trained with another template."""
    import gguf

    if dtype not in DTYPES:
        raise UserError(f"GGUF model dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config = read_hf_config(model_dir)
    family = family_for(config)
    tokenizer, split = read_tokenizer(model_dir)
    weights = _iter_weights(model_dir)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    with writing(out_path) as partial:
        writer = gguf.GGUFWriter(partial, family.gguf_arch)
        _add_hyperparameters(writer, config, family, os.path.basename(os.path.abspath(model_dir)), int(file_type))
        if dtype == "q8_0":
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        add_tokenizer(writer, model_dir, tokenizer, split, int(config["vocab_size"]), chat_template)
        for name, array in iter_gguf_tensors(config, family, weights):
            data, raw_dtype = _encode(array, dtype)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        finish(writer)
    return out_path


@contextlib.contextmanager
def writing(out_path: str):
    """A temporary path beside `out_path`, renamed to it when the block completes and removed when it fails."""
    directory = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(directory):
        raise UserError(f"the directory of {out_path!r} does not exist: create it first")
    partial = os.path.join(directory, f".{os.path.basename(out_path)}.partial-{os.getpid()}")
    try:
        yield partial
        os.replace(partial, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(partial)


def finish(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
