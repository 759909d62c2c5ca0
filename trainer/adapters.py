"""Parameter-efficient fine-tuning through PEFT: LoRA (rsLoRA), DoRA, QLoRA, IA3, prompt and prefix tuning; the
trainable-parameter report; loading saved adapters; and merging the additive ones into their base.

QLoRA's 4-bit base is loaded by trainer/model.py; from here on it is LoRA on whatever linears the base has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from trainer.errors import ConfigError, UserError

LORA_FAMILY = ("lora", "dora", "qlora")
PROMPT_LEARNING = ("prompt_tuning", "prefix_tuning")
# Module names whose *input* IA3 scales (the feed-forward output projections); the others scale their output.
FEEDFORWARD_OUTPUTS = ("down_proj", "w2", "fc2", "dense_4h_to_h")
_ATTENTION_PARENTS = ("attn", "attention")
_MLP_PARENTS = ("mlp", "feed_forward", "ffn", "block_sparse_moe", "experts")


@dataclass
class ParameterReport:
    trainable: int
    total: int

    def __str__(self) -> str:
        share = 100.0 * self.trainable / max(self.total, 1)
        return f"trainable parameters: {self.trainable:,} of {self.total:,} ({share:.2f}%)"


def _numel(param) -> int:
    # ZeRO-3 partitions parameters in place (numel() is then 0) and keeps the full size in ds_numel.
    count = int(getattr(param, "ds_numel", 0) or param.numel())
    if type(param).__name__ == "Params4bit":
        count *= 2 * param.element_size()  # two 4-bit weights per byte of the packed storage
    return count


def parameter_report(model) -> ParameterReport:
    trainable = sum(_numel(p) for p in model.parameters() if p.requires_grad)
    total = sum(_numel(p) for p in model.parameters())
    from trainer.host_embedding import HostEmbedding

    # train.embedding_on_host holds the embedding outside the module tree (still part of the model)
    total += sum(_numel(m.weight) for m in model.modules() if isinstance(m, HostEmbedding))
    return ParameterReport(trainable, total)


# ------------------------------------------------------------------------------------------------ targets
def _decoder_linears(model) -> list[tuple[str, str]]:
    """(parent path, leaf name) of every linear layer inside a decoder layer (bitsandbytes' subclass nn.Linear)."""
    import torch

    from trainer.freezing import layer_index

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and layer_index(name + ".") is not None:
            parent, _, leaf = name.rpartition(".")
            found.append((parent, leaf))
    return found


def resolve_target_modules(model, targets, key: str = "peft.target_modules") -> list[str] | str:
    """Module names for PEFT. `attention`/`mlp` pick the linears under a decoder layer's attention or feed-forward
    block, `all-linear` every linear in the decoder layers (lm_head never); a list passes through."""
    if not isinstance(targets, str):
        return list(targets)
    linears = _decoder_linears(model)
    if targets == "attention":
        names = [leaf for parent, leaf in linears if any(p in parent.rsplit(".", 1)[-1] for p in _ATTENTION_PARENTS)]
    elif targets == "mlp":
        names = [leaf for parent, leaf in linears if any(p in parent for p in _MLP_PARENTS)]
    else:
        names = [leaf for _, leaf in linears]
    names = sorted(set(names))
    if not names:
        raise ConfigError(key, f"{targets!r} matches no linear layer in {type(model).__name__}'s decoder layers; "
                          "list the module names instead (e.g. [q_proj, v_proj])")
    return names


def fused_expert_parameters(model) -> list[str]:
    """PEFT target_parameters for the fused 3-D expert weights of an MoE model's decoder layers (Mixtral in
    transformers 5: `mlp.experts.gate_up_proj`, `mlp.experts.down_proj`), by their path below the layer."""
    from trainer.freezing import layer_index

    found = set()
    for name, param in model.named_parameters():
        if param.dim() == 3 and ".experts." in name and layer_index(name) is not None:
            found.add(name.split(f".{layer_index(name)}.", 1)[1])
    return sorted(found)


# ------------------------------------------------------------------------------------------------- methods
def build_peft_config(cfg, model):
    """Our `peft` section -> the PEFT library's config object."""
    import peft

    saved = list(getattr(cfg, "modules_to_save", None) or []) or None
    if cfg.name in LORA_FAMILY:
        # all-linear is resolved here rather than by PEFT: PEFT's also wraps the fused 3-D expert weights of MoE models
        # (Mixtral in transformers 5), which its LoRA supports only without dropout; ours takes nn.Linear layers.
        targets = resolve_target_modules(model, cfg.target_modules)
        experts = None
        if getattr(cfg, "experts", False):
            experts = fused_expert_parameters(model)
            if not experts:
                raise ConfigError("peft.experts", f"{type(model).__name__} has no fused expert weights (3-D "
                                  "parameters under .experts.); set peft.experts=false")
        return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets,
                               target_parameters=experts, bias=cfg.bias, use_rslora=cfg.use_rslora,
                               use_dora=cfg.name == "dora", modules_to_save=saved, task_type="CAUSAL_LM")
    if cfg.name == "ia3":
        if cfg.target_modules is None:
            return peft.IA3Config(modules_to_save=saved, task_type="CAUSAL_LM")  # PEFT's per-family defaults
        targets = resolve_target_modules(model, cfg.target_modules)
        feedforward = list(cfg.feedforward_modules) if cfg.feedforward_modules is not None else [
            t for t in targets if t in FEEDFORWARD_OUTPUTS]
        if not set(feedforward) <= set(targets):
            raise ConfigError("peft.feedforward_modules", f"{feedforward} must be among the targets {targets}")
        return peft.IA3Config(target_modules=targets, feedforward_modules=feedforward, modules_to_save=saved,
                              task_type="CAUSAL_LM")
    if cfg.name == "prompt_tuning":
        from_text = cfg.init == "text"
        tokenizer_path = getattr(model, "name_or_path", None) if from_text else None
        return peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                       prompt_tuning_init="TEXT" if from_text else "RANDOM",
                                       prompt_tuning_init_text=cfg.init_text if from_text else None,
                                       tokenizer_name_or_path=tokenizer_path)
    if cfg.name == "prefix_tuning":
        hidden = cfg.encoder_hidden_size or model.config.hidden_size
        return peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=cfg.num_virtual_tokens,
                                       prefix_projection=cfg.prefix_projection, encoder_hidden_size=hidden)
    raise NotImplementedError(f"peft method {cfg.name!r}")


def apply_peft(model, cfg):
    """Wrap `model` for the configured method; full fine-tuning (peft=none) returns it unchanged."""
    if cfg.name == "none":
        return model
    from peft import get_peft_model

    wrapped = get_peft_model(model, build_peft_config(cfg, model))
    if cfg.name in PROMPT_LEARNING:
        _use_prompt_learning_forward(wrapped)
    if getattr(cfg, "init_from", None):
        load_initial_adapter(wrapped, cfg.init_from)
    return wrapped


def initial_adapter_dir(path: str) -> str:
    """peft.init_from: an adapter dir, or a run dir whose final/ holds one."""
    final = os.path.join(path, "final")
    return final if os.path.isfile(os.path.join(final, "adapter_config.json")) else path


def load_initial_adapter(model, path: str) -> None:
    """Copy an existing adapter's weights into the freshly wrapped model (same method, rank and targets: checked
    by trainer/preflight.py before anything loads). Every adapter tensor must find its place: a partial load would
    train a half-fresh adapter while claiming to continue the old one."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    adapter_dir = initial_adapter_dir(path)
    weights = os.path.join(adapter_dir, "adapter_model.safetensors")
    if not os.path.isfile(weights):
        raise ConfigError("peft.init_from", f"{adapter_dir!r} has no adapter_model.safetensors")
    result = set_peft_model_state_dict(model, load_file(weights))
    unexpected = list(getattr(result, "unexpected_keys", None) or [])
    if unexpected:
        raise ConfigError("peft.init_from", f"{len(unexpected)} of the adapter's tensors have no place in this "
                          f"model (e.g. {unexpected[0]}): it was trained on another base or with other targets")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


# ------------------------------------------------------------------------------------------ prompt learning
_prompt_learning_class = None


def _use_prompt_learning_forward(model) -> None:
    """Give a prompt/prefix-tuning PeftModel the forward our loops need (see `_prompt_learning_forward`).

    The class is swapped rather than the model rebuilt: get_peft_model has set everything up, and the subclass only
    replaces `forward`, so saving and loading stay PEFT's own."""
    global _prompt_learning_class
    if _prompt_learning_class is None:
        from peft import PeftModelForCausalLM

        _prompt_learning_class = type("PromptLearningForCausalLM", (PeftModelForCausalLM,),
                                      {"forward": _prompt_learning_forward, "__module__": __name__})
    model.__class__ = _prompt_learning_class


def _prompt_learning_forward(self, input_ids=None, attention_mask=None, position_ids=None, past_key_values=None,
                             **kwargs):
    """PEFT's own forward prepends the virtual tokens on every call, returns their logits too, and knows nothing of
    packed rows. Our loops need logits aligned with their labels, greedy decoding feeds one token at a time with a
    KV cache that already holds the virtual tokens, and packed rows carry several samples. So: virtual tokens only
    on the first (uncached) call, their logits dropped, position ids shifted past them, and the mask extended so
    that every token sees them. In a packed row all samples then share one block of virtual tokens, which is
    exact: a virtual token attends only to virtual tokens, so its states are the same for every sample."""
    import torch
    from peft.utils import PeftType

    config = self.active_peft_config
    n = config.num_virtual_tokens
    batch = input_ids.shape[0]
    fresh = past_key_values is None or past_key_values.get_seq_length() == 0
    prefix = config.peft_type == PeftType.PREFIX_TUNING
    if attention_mask is not None:
        attention_mask = _mask_with_virtual_tokens(attention_mask, n, add_virtual_queries=fresh and not prefix)
    if position_ids is not None:
        position_ids = position_ids + n
    if prefix:
        if fresh:
            past_key_values = self.get_prompt(batch, max_cache_len=input_ids.shape[1] + n)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=past_key_values, **kwargs)
    embeds = self.word_embeddings(input_ids)
    if fresh:
        prompts = self.get_prompt(batch_size=batch).to(embeds.dtype)
        embeds = torch.cat([prompts, embeds], dim=1)
        if position_ids is not None:
            virtual = torch.arange(n, device=position_ids.device).expand(batch, n)
            position_ids = torch.cat([virtual, position_ids], dim=1)
    out = self.base_model(inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids,
                          past_key_values=past_key_values, **kwargs)
    if fresh:
        out.logits = out.logits[:, n:]
    return out


def _mask_with_virtual_tokens(mask, n: int, add_virtual_queries: bool):
    """A 2-D padding mask gains n leading ones. A 4-D mask ([batch, 1, queries, keys]; boolean, or additive with 0
    where attention is allowed) gains n key columns every query may see and, when the virtual tokens are also
    queries (prompt tuning's first call), n query rows that see only the virtual tokens, causally."""
    import torch

    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
    batch, heads, queries, keys = mask.shape
    boolean = mask.dtype == torch.bool
    allowed = True if boolean else 0.0
    blocked = False if boolean else torch.finfo(mask.dtype).min
    mask = torch.cat([mask.new_full((batch, heads, queries, n), allowed), mask], dim=3)
    if add_virtual_queries:
        causal = torch.ones(n, n, dtype=torch.bool, device=mask.device).tril()
        top = mask.new_full((batch, heads, n, n + keys), blocked)
        top[..., :n] = torch.where(causal, allowed, blocked) if not boolean else causal
        mask = torch.cat([top, mask], dim=2)
    return mask


# --------------------------------------------------------------------------------------- saved adapters
def read_adapter_config(adapter_dir: str) -> dict:
    from trainer.jsonfile import read_json_in

    return read_json_in(adapter_dir, "adapter_config.json",
                        f"{adapter_dir!r} is not a PEFT adapter dir (no adapter_config.json)")


def read_run_config(adapter_dir: str) -> dict:
    """The frozen config of the run that wrote `adapter_dir` (config.yaml in the adapter dir's parent, the run dir),
    as plain data, or {} for an adapter from elsewhere. QLoRA's quantisation settings live only there."""
    for candidate in (os.path.join(adapter_dir, "config.yaml"), os.path.join(os.path.dirname(
            os.path.abspath(adapter_dir)), "config.yaml")):
        if os.path.isfile(candidate):
            from omegaconf import OmegaConf

            raw = OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)
            return raw if isinstance(raw, dict) else {}
    return {}


def load_base_for_adapter(adapter_dir: str, base_path: str | None = None, dtype: str = "auto",
                          dequantize: bool = False, trust_remote_code: bool = False):
    """The base model an adapter was trained on: 4-bit as in training for a QLoRA run (de-quantised when
    `dequantize`), else in `dtype` (fp32 | bf16 | fp16 | auto: the checkpoint's own; for QLoRA, the compute dtype)."""
    from transformers import AutoModelForCausalLM

    from trainer.model import torch_dtype

    base_path = base_path or read_adapter_config(adapter_dir).get("base_model_name_or_path")
    if not base_path:
        raise UserError(f"{adapter_dir!r} does not name its base model: give the base model dir")
    run = read_run_config(adapter_dir)
    peft_section = dict(run.get("peft") or {})
    if peft_section.get("name") != "qlora":
        return AutoModelForCausalLM.from_pretrained(base_path, dtype="auto" if dtype == "auto" else torch_dtype(dtype),
                                                    trust_remote_code=trust_remote_code)
    from types import SimpleNamespace

    from trainer.model import adapt_4bit_layers, quantization_config

    settings = {"quant_type": "nf4", "double_quant": True, "compute_dtype": "auto", "quant_storage": "uint8",
                **peft_section}
    precision = (run.get("train") or {}).get("precision", "fp32")
    quantization = quantization_config(SimpleNamespace(**settings), precision)
    compute = quantization.bnb_4bit_compute_dtype
    model = adapt_4bit_layers(AutoModelForCausalLM.from_pretrained(base_path, dtype=compute,
                                                                   quantization_config=quantization,
                                                                   trust_remote_code=trust_remote_code))
    if dequantize:
        model = model.dequantize()
        model.to(compute if dtype == "auto" else torch_dtype(dtype))
    return model


def load_adapter_model(base, adapter_dir: str, name: str = "default"):
    """`base` with the adapter at `adapter_dir` attached under `name` (frozen, in eval mode)."""
    from peft import PeftModel

    read_adapter_config(adapter_dir)  # a missing or damaged file is a one-line error here, not a traceback in peft
    model = PeftModel.from_pretrained(base, adapter_dir, adapter_name=name)
    if model.active_peft_config.is_prompt_learning:
        _use_prompt_learning_forward(model)
    return model.eval()


def merge_adapter(adapter_dir: str, out_dir: str, base_path: str | None = None, dtype: str = "auto",
                  trust_remote_code: bool = False) -> str:
    """Fold an additive adapter (LoRA, rsLoRA, DoRA, IA3; QLoRA into its de-quantised base) into the base weights and
    write a plain Hugging Face model dir (with the tokenizer when the adapter dir has one). Returns `out_dir`.

    QLoRA merges into the base as training saw it, de-quantised, not into the original full-precision weights:
    the merged model then computes what the adapter model computes (the quantisation error is part of what the
    adapters learnt to correct)."""
    config = read_adapter_config(adapter_dir)
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type not in ("LORA", "IA3"):
        raise UserError(f"{adapter_dir!r} holds a {peft_type or 'unknown'} adapter: only additive adapters (LoRA, "
                        "DoRA, IA3, QLoRA) merge into the base weights; prompt and prefix tuning add virtual tokens, "
                        "load them with the base instead (trainer generate --adapter)")
    base = load_base_for_adapter(adapter_dir, base_path, dtype, dequantize=True, trust_remote_code=trust_remote_code)
    merged = load_adapter_model(base, adapter_dir).merge_and_unload()
    os.makedirs(out_dir, exist_ok=True)
    merged.save_pretrained(out_dir)
    from transformers import AutoTokenizer

    has_own = os.path.isfile(os.path.join(adapter_dir, "tokenizer_config.json"))
    base_path = base_path or config.get("base_model_name_or_path")
    AutoTokenizer.from_pretrained(adapter_dir if has_own else base_path,
                                  trust_remote_code=trust_remote_code).save_pretrained(out_dir)
    return out_dir
