"""Load a Hugging Face causal LM and its tokenizer from a local dir (or a hub id where one is reachable).

No distributed code lives here: strategies shard, wrap and checkpoint what this returns. Weights load
through safetensors (or `weights_only` pickles); code shipped with a checkpoint runs only when
`model.trust_remote_code=true`.
"""

from __future__ import annotations

import logging

from trainer.config.schema import ModelConfig
from trainer.errors import ConfigError

log = logging.getLogger(__name__)


def torch_dtype(name: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.path
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise ConfigError("model.tokenizer" if cfg.tokenizer else "model.path",
                          f"cannot load a tokenizer from {source!r}: {_one_line(err)}") from None
    if tokenizer.pad_token_id is None:
        # Padding positions are masked out of attention and loss, so any id works; EOS is always present.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _one_line(err: Exception, limit: int = 300) -> str:
    """A library's multi-line message (some end their first line with "one of:") folded into one line."""
    text = " ".join(line.strip() for line in str(err).splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def load_model_config(cfg: ModelConfig):
    from transformers import AutoConfig

    if cfg.path is not None:
        return AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    arch = dict(cfg.arch or {})
    model_type = arch.pop("model_type", None)
    if not model_type:
        raise ConfigError("model.arch.model_type", "is required to build a model from model.arch")
    return AutoConfig.for_model(model_type, **arch)


def load_model(cfg: ModelConfig, dtype, on_meta: bool = False):
    """The model in `dtype`, on CPU; random weights when `model.init=random` (pre-training from scratch).

    `on_meta=True` builds the architecture without allocating weights (parameters on the meta device,
    buffers such as rotary frequencies real), for ranks that receive their shard from rank 0 instead.
    """
    from transformers import AutoModelForCausalLM

    common = {"attn_implementation": attention_implementation(cfg), "trust_remote_code": cfg.trust_remote_code}
    if on_meta:
        from accelerate import init_empty_weights

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(load_model_config(cfg), dtype=dtype, **common)
    elif cfg.init == "random":
        model = AutoModelForCausalLM.from_config(load_model_config(cfg), dtype=dtype, **common)
    else:
        from trainer.preflight import check_model_files

        check_model_files(cfg)
        model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, **common)
    model.config.use_cache = False  # the KV cache only costs memory in training
    return model


def quantization_config(peft_cfg, precision: str):
    """bitsandbytes' 4-bit config for peft=qlora (None otherwise). The compute dtype follows train.precision unless
    set; a float quant storage (bf16) lets FSDP2/ZeRO-3 treat the packed weights as ordinary tensors."""
    if peft_cfg.name != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = precision if peft_cfg.compute_dtype == "auto" else peft_cfg.compute_dtype
    storage = torch.uint8 if peft_cfg.quant_storage == "uint8" else torch_dtype(peft_cfg.quant_storage)
    # transformers leaves the output layer unquantised by default; an empty skip list quantises it too (the embedding
    # is an nn.Embedding, which bitsandbytes never replaces)
    skip = [] if getattr(peft_cfg, "quantize_lm_head", False) else None
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=peft_cfg.quant_type,
                              bnb_4bit_use_double_quant=peft_cfg.double_quant, llm_int8_skip_modules=skip,
                              bnb_4bit_compute_dtype=torch_dtype(compute), bnb_4bit_quant_storage=storage)


def load_quantized_model(cfg: ModelConfig, quantization, dtype):
    """A pretrained checkpoint with its decoder linears quantised to 4 bits while loading (embeddings, norms and
    lm_head stay in `dtype`). With CUDA the weights are quantised straight onto this process's current GPU, so the
    full-precision model never has to fit there; without it bitsandbytes quantises on the CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    if cfg.init == "random":
        raise ConfigError("peft", "qlora quantises a pretrained checkpoint while loading it; model.init=random has "
                          "none (use peft=lora to train fresh weights)")
    from transformers.integrations import is_deepspeed_zero3_enabled

    # ZeRO-3 places each partition itself (transformers refuses a device_map under it).
    on_gpu = torch.cuda.is_available() and not is_deepspeed_zero3_enabled()
    extra = {"device_map": {"": torch.cuda.current_device()}} if on_gpu else {}
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=dtype, quantization_config=quantization,
                                                 attn_implementation=attention_implementation(cfg),
                                                 trust_remote_code=cfg.trust_remote_code, **extra)
    model.config.use_cache = False
    return adapt_4bit_layers(model)


def adapt_4bit_layers(model):
    """Settings every 4-bit model of ours needs (training, merging, generation); returns `model`."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            # bitsandbytes' CPU inference path repacks a layer's weights in place on the first no-grad eval forward:
            # it asserts out_features % 32 == 0 (false for e.g. 688), and the repacked storage is no longer what
            # training, sharding and checkpoints expect. Training-time evaluation uses the regular kernel instead.
            module.support_avx512bf16_for_cpu = False
            module.register_state_dict_post_hook(_drop_quant_state_entries)
    return model


def _drop_quant_state_entries(module, state_dict, prefix, local_metadata) -> None:
    """Keep a 4-bit layer's state dict to its parameters. bitsandbytes adds the quantisation state (absmax, code
    book, ...) as extra entries, which no parameter or buffer receives when a strategy loads a full state dict into
    the sharded model (FSDP2's broadcast from rank 0). Every rank quantises the same checkpoint deterministically,
    so its own quantisation state is already right, and training only ever saves the adapters."""
    for key in [k for k in state_dict if k.startswith(f"{prefix}weight.")]:
        del state_dict[key]


def attention_implementation(cfg: ModelConfig) -> str:
    """model.attn_implementation, with `auto` decided as a composed config decides it (trainer/config/defaults.py)
    for callers that build a ModelConfig themselves."""
    if cfg.attn_implementation != "auto":
        return cfg.attn_implementation
    from trainer.config.defaults import sdpa_refusal

    return "eager" if sdpa_refusal(cfg) else "sdpa"


def build_model(model_cfg: ModelConfig, peft_cfg, precision: str, on_meta: bool = False,
                all_in_compute_dtype: bool = False, freeze=None):
    """Load the model, apply PEFT, then `optim.freeze` (trainer/freezing.py). Trainable weights are fp32 (the
    optimizer's master copy; autocast or the strategy's mixed-precision policy gives bf16/fp16 compute); frozen
    base weights under PEFT never see an update, so with bf16 they are kept in bf16 to halve their memory.
    `all_in_compute_dtype` is for engines that keep fp32 master weights themselves (DeepSpeed): everything is built
    in the compute dtype.

    QLoRA ignores `on_meta`: every rank quantises its own copy, because a 4-bit weight's quantisation state (block
    scales, code book) lives beside the parameter, not in it, so it cannot be broadcast as a parameter shard."""
    import torch

    from trainer.adapters import apply_peft
    from trainer.freezing import apply_static_freezing
    from trainer.kernels import apply_kernels

    quantization = quantization_config(peft_cfg, precision)
    if quantization is not None:
        if getattr(peft_cfg, "quantize_lm_head", False) and load_model_config(model_cfg).tie_word_embeddings:
            raise ConfigError("peft.quantize_lm_head", "this model's lm_head is its embedding (tie_word_embeddings), "
                              "which stays in the compute dtype: set peft.quantize_lm_head=false")
        model = load_quantized_model(model_cfg, quantization, quantization.bnb_4bit_compute_dtype)
        model = apply_peft(freeze_quantized_base(apply_kernels(model, model_cfg.kernels)), peft_cfg)
        if all_in_compute_dtype:
            _cast_float_params(model, torch_dtype(precision), only_trainable=False)
    elif all_in_compute_dtype:
        model = apply_peft(apply_kernels(load_model(model_cfg, torch_dtype(precision), on_meta=on_meta),
                                         model_cfg.kernels), peft_cfg)
    else:
        frozen_dtype = torch_dtype(precision) if peft_cfg.name != "none" and precision == "bf16" else torch.float32
        model = apply_peft(apply_kernels(load_model(model_cfg, frozen_dtype, on_meta=on_meta), model_cfg.kernels),
                           peft_cfg)
    if not all_in_compute_dtype:
        _cast_float_params(model, torch.float32, only_trainable=True)
    apply_static_freezing(model, freeze)
    return model


def freeze_quantized_base(model):
    """Freeze a 4-bit base for adapter training, leaving its unquantised weights (embeddings, norms, lm_head) in the
    compute dtype they were loaded in.

    This is what we keep of peft's prepare_model_for_kbit_training. It also casts those weights to fp32 "for
    stability", which costs Llama-3.1-8B 2 GiB more for embeddings and lm_head, and makes the residual stream and the
    MLP's intermediates fp32 under autocast. They never train, and the arithmetic that needs fp32 already runs in
    fp32: transformers' RMSNorms normalise in fp32 whatever their weight's dtype, and the loss upcasts logits. Its
    other job, input gradients for checkpointed layers, is the strategy's (enable_input_require_grads where it
    applies activation checkpointing). What stays fp32: the trainable adapters (the optimizer's master copy) and the
    4-bit layers' quantisation constants."""
    for param in model.parameters():
        param.requires_grad_(False)
    return model


def _cast_float_params(model, dtype, only_trainable: bool) -> None:
    """Cast floating-point parameters (never bitsandbytes' packed 4-bit ones) to `dtype`."""
    for param in model.parameters():
        if only_trainable and not param.requires_grad:
            continue
        if param.dtype.is_floating_point and param.dtype != dtype and type(param).__name__ != "Params4bit":
            param.data = param.data.to(dtype)
