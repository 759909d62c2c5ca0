"""Small, faithful replicas of real model families: the real architecture with fewer and narrower layers.

A replica keeps everything that changes a code path -- the real vocabulary size, RoPE scaling, tied embeddings,
attention/MLP biases, sliding windows, logit soft-capping, an explicit head_dim, the GQA/MQA head ratio, experts
and top-k, fused projections -- and shrinks only depth and width. Its tokenizer is a small BPE trained on the
demo world's text -- byte-level BPE or, for the SentencePiece families (Llama 2, Mistral, Mixtral, Phi-3, Gemma),
SentencePiece-style BPE with byte fallback -- with the family's own special tokens and a chat template that writes
the family's own turn format. Weights are random (seeded); a test that needs a model that has learnt something
trains one briefly.

    python -m trainer.replicas OUT_DIR [FAMILY ...]     # one model dir per family (all families by default)

The figures in FAMILIES are the real configs' (Hugging Face config.json); `shrink` divides the widths.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# Chat templates in each family's turn format (written for this project; the masking rule in
# trainer/data/templates.py checks every record that a template renders turn by turn).
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + "
    "m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
_SYSTEM_FIRST = (  # a leading system message is taken out of the turns and handed to the first user turn
    "{% if messages and messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set turns = messages[1:] %}{% else %}{% set system = '' %}{% set turns = messages %}{% endif %}")
_LLAMA2_TEMPLATE = _SYSTEM_FIRST + (  # [INST] turns; the system prompt inside the first, in <<SYS>> tags
    "{% for m in turns %}{% if m['role'] == 'user' %}{{ bos_token + '[INST] ' + "
    "('<<SYS>>\n' + system + '\n<</SYS>>\n\n' if system and loop.first else '') + m['content'] | trim + "
    "' [/INST]' }}{% else %}{{ ' ' + m['content'] | trim + ' ' + eos_token }}{% endif %}{% endfor %}")
_CHATML_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
_GEMMA_TEMPLATE = _SYSTEM_FIRST + (  # the assistant is "model"; no system role: it leads the first user turn
    "{{ bos_token }}{% for m in turns %}"
    "{{ '<start_of_turn>' + ('model' if m['role'] == 'assistant' else 'user') + '\n' + "
    "(system + '\n\n' if system and loop.first else '') + m['content'] | trim + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
_PHI3_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}")

_LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
# Per family: the real config's fields that matter (widths are shrunk by `shrink`), the special tokens, the template.
FAMILIES: dict[str, dict] = {
    "llama-2": {
        "config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0,
                   "max_position_embeddings": 4096, "tie_word_embeddings": False, "hidden_act": "silu"},
        "special": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, "extra": [], "template": _LLAMA2_TEMPLATE,
        "tokenizer": "sentencepiece"},
    "llama-3.1": {
        "config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 500000.0,
                   "rope_scaling": _LLAMA3_ROPE, "max_position_embeddings": 131072, "tie_word_embeddings": False,
                   "hidden_act": "silu"},
        "special": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"},
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], "template": _LLAMA3_TEMPLATE},
    "llama-3.2": {  # tied embeddings and an explicit head_dim
        "config": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
                   "rope_scaling": {**_LLAMA3_ROPE, "factor": 32.0}, "max_position_embeddings": 131072,
                   "tie_word_embeddings": True, "hidden_act": "silu"},
        "special": {"bos": "<|begin_of_text|>", "eos": "<|eot_id|>"},
        "extra": ["<|start_header_id|>", "<|end_header_id|>", "<|end_of_text|>"], "template": _LLAMA3_TEMPLATE},
    "mistral": {
        "config": {"architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 10000.0, "sliding_window": 4096,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"},
        "special": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, "extra": [], "template": _LLAMA2_TEMPLATE,
        "tokenizer": "sentencepiece"},
    "mixtral": {
        "config": {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
                   "num_attention_heads": 32, "num_key_value_heads": 8, "rope_theta": 1000000.0,
                   "num_local_experts": 8, "num_experts_per_tok": 2, "router_aux_loss_coef": 0.02,
                   "max_position_embeddings": 32768, "tie_word_embeddings": False, "hidden_act": "silu"},
        "special": {"bos": "<s>", "eos": "</s>", "unk": "<unk>"}, "extra": [], "template": _LLAMA2_TEMPLATE,
        "tokenizer": "sentencepiece-legacy"},
    "qwen2.5": {  # q/k/v biases; a sliding window that is configured but off
        "config": {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 152064,
                   "num_attention_heads": 64, "num_key_value_heads": 8, "rope_theta": 1000000.0,
                   "sliding_window": 131072, "use_sliding_window": False, "max_position_embeddings": 32768,
                   "tie_word_embeddings": False, "hidden_act": "silu"},
        "special": {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>"}, "extra": ["<|im_start|>"],
        "template": _CHATML_TEMPLATE},
    "gemma": {  # multi-query attention, head_dim 256 x 8 heads = hidden, tied embeddings, gelu
        "config": {"architectures": ["GemmaForCausalLM"], "model_type": "gemma", "vocab_size": 256000,
                   "num_attention_heads": 8, "num_key_value_heads": 1, "head_dim": 256, "rope_theta": 10000.0,
                   "max_position_embeddings": 8192, "hidden_act": "gelu_pytorch_tanh",
                   "hidden_activation": "gelu_pytorch_tanh"},
        "special": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, "extra": ["<start_of_turn>", "<end_of_turn>"],
        "template": _GEMMA_TEMPLATE, "tokenizer": "gemma"},
    "gemma-2": {  # soft-capping, query_pre_attn_scalar, alternating sliding window; heads x head_dim != hidden
        "config": {"architectures": ["Gemma2ForCausalLM"], "model_type": "gemma2", "vocab_size": 256000,
                   "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 256, "rope_theta": 10000.0,
                   "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0,
                   "query_pre_attn_scalar": 256, "max_position_embeddings": 8192,
                   "hidden_activation": "gelu_pytorch_tanh"},
        "special": {"bos": "<bos>", "eos": "<eos>", "pad": "<pad>"}, "extra": ["<start_of_turn>", "<end_of_turn>"],
        "template": _GEMMA_TEMPLATE, "tokenizer": "gemma"},
    "phi-3": {  # fused qkv_proj and gate_up_proj
        "config": {"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "vocab_size": 32064,
                   "num_attention_heads": 32, "num_key_value_heads": 32, "rope_theta": 10000.0,
                   "sliding_window": 2047, "max_position_embeddings": 4096, "tie_word_embeddings": False,
                   "hidden_act": "silu"},
        "special": {"bos": "<s>", "eos": "<|end|>", "unk": "<unk>"},
        "extra": ["<|endoftext|>", "<|user|>", "<|assistant|>", "<|system|>"], "template": _PHI3_TEMPLATE,
        "tokenizer": "sentencepiece"},
}
REAL_WIDTHS = {  # hidden, intermediate (per expert for Mixtral), head_dim: for `shrink`'s ratios
    "llama-2": (4096, 11008, 128), "llama-3.1": (4096, 14336, 128), "llama-3.2": (2048, 8192, 64),
    "mistral": (4096, 14336, 128), "mixtral": (4096, 14336, 128), "qwen2.5": (8192, 29568, 128),
    "gemma": (2048, 16384, 256), "gemma-2": (3584, 14336, 256), "phi-3": (3072, 8192, 96),
}
HEAD_DIM = 8  # every replica's head_dim; heads keep the real GQA/MQA ratio
NUM_LAYERS = 2
REPLICA_TOKENIZER_VOCAB = 512


def shrink(family: str) -> dict:
    """The replica's config.json: the real fields, with the width of HEAD_DIM-wide heads (the head counts divided
    so that the ratio of query to KV heads stays the real one) and NUM_LAYERS layers."""
    spec = FAMILIES[family]
    config = dict(spec["config"])
    hidden, intermediate, head_dim = REAL_WIDTHS[family]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    ratio = heads // kv_heads
    kv = 1 if ratio >= 8 else max(1, min(kv_heads, 2))
    new_heads = kv * ratio if ratio > 1 else 4
    kv = kv if ratio > 1 else new_heads
    # hidden / (heads x head_dim) is kept (Gemma 2: 3584 / (16 x 256) = 0.875), rounded to a multiple of 8.
    new_hidden = max(8, round(hidden / (heads * head_dim) * new_heads * HEAD_DIM / 8) * 8)
    new_intermediate = max(16, round(intermediate / hidden * new_hidden / 8) * 8)
    config.update({"hidden_size": new_hidden, "intermediate_size": new_intermediate,
                   "num_attention_heads": new_heads, "num_key_value_heads": kv, "num_hidden_layers": NUM_LAYERS,
                   "head_dim": HEAD_DIM, "rms_norm_eps": 1e-5, "initializer_range": 0.02, "use_cache": True})
    if "query_pre_attn_scalar" in config:  # Gemma 2 scales queries by 1/sqrt(head_dim): the real 256 is its head_dim
        config["query_pre_attn_scalar"] = HEAD_DIM
    return config


def _train_tokenizer(family: str, out_dir: Path):
    """The family's kind of tokenizer, trained on the demo world's text: byte-level BPE (Llama 3, Qwen 2), or
    SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Mixtral, Phi-3, Gemma) built by transformers'
    own tokenizer class for that family, so that it splits text as the real one does (a "▁" word prefix; bytes
    outside the vocabulary as <0xNN> tokens)."""
    spec = FAMILIES[family]
    kind = spec.get("tokenizer", "byte-level")
    tokenizer = _byte_level_tokenizer(spec) if kind == "byte-level" else _sentencepiece_style_tokenizer(spec, kind)
    tokenizer.chat_template = spec["template"]
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _corpus():
    from trainer.demo.world import make_world, pretraining_corpus

    return pretraining_corpus(make_world(seed=1), paragraphs_per_creature=2)


def _byte_level_tokenizer(spec: dict):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    named = {role: token for role, token in spec["special"].items() if token}
    specials = list(dict.fromkeys([*named.values(), *spec["extra"]]))
    tokenizer = Tokenizer(models.BPE(unk_token=named.get("unk")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=REPLICA_TOKENIZER_VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **{f"{role}_token": token
                                                                  for role, token in named.items()},
                                   additional_special_tokens=spec["extra"])


def _sentencepiece_style_tokenizer(spec: dict, kind: str):
    """Vocabulary laid out as the real ones are: the special tokens, the 256 byte tokens, then the merged pieces
    in merge order (so that a piece's id is its merge rank, as SentencePiece's scores order them)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    named = {role: token for role, token in spec["special"].items() if token}
    if kind == "gemma":
        leading = [named["pad"], named["eos"], named["bos"], "<unk>", "<mask>"]
    else:
        leading = [named["unk"], named["bos"], named["eos"]]
    learner = Tokenizer(models.BPE())
    learner.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never" if kind == "gemma" else "always")
    pieces = REPLICA_TOKENIZER_VOCAB - len(leading)  # on top of the 256 byte tokens
    learner.train_from_iterator(_corpus(), trainer=trainers.BpeTrainer(vocab_size=pieces, show_progress=False))
    learnt = json.loads(learner.to_str())["model"]
    vocab = {token: index for index, token in enumerate(leading)}
    vocab.update({f"<0x{byte:02X}>": len(leading) + byte for byte in range(256)})
    for token in sorted(learnt["vocab"], key=learnt["vocab"].get):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in learnt["merges"]]
    if kind == "gemma":
        return GemmaTokenizer(vocab=vocab, merges=merges, additional_special_tokens=spec["extra"])
    return LlamaTokenizer(vocab=vocab, merges=merges, legacy=kind == "sentencepiece-legacy",
                          unk_token=named["unk"], bos_token=named["bos"], eos_token=named["eos"],
                          additional_special_tokens=spec["extra"])


def build_replica(family: str, out_dir: str | Path, seed: int = 0) -> Path:
    """Write a replica of FAMILY (config, random weights as safetensors, tokenizer with its chat template)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r} (known: {', '.join(FAMILIES)})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(family, out)
    config = shrink(family)
    config.update({f"{role}_token_id": tokenizer.convert_tokens_to_ids(token)
                   for role, token in FAMILIES[family]["special"].items() if token and role in ("bos", "eos", "pad")})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(out))
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)  # as the real checkpoints ship
    return out


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip().splitlines()[4].strip())
        return 0 if argv else 2
    out, families = Path(argv[0]), argv[1:] or list(FAMILIES)
    for family in families:
        print(f"{family}: {build_replica(family, out / family)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
