"""The three artefacts `trainer export` writes, each a dir that `from_pretrained` loads.

- `hf`: a full fine-tune as a Hugging Face model: safetensors shards (+ index when sharded), config.json,
  generation_config.json, tokenizer. Streamed: one tensor in memory at a time.
- `adapter`: a PEFT adapter dir (adapter_config.json + adapter_model.safetensors + tokenizer); PEFT itself
  renames the checkpoint's in-memory adapter weights to its saved names. Adapters are small: held at once.
- `merged`: the adapter folded into its base model with PEFT's merge_and_unload (QLoRA into the de-quantised
  base, as training saw it), through `trainer.adapters.merge_adapter`. This loads the whole base model.
"""

from __future__ import annotations

import os
import shutil

import torch

from trainer.errors import UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process, from /proc (0 where there is no /proc)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def write_hf_model(source, out_dir: str, dtype: str, max_shard_bytes: int) -> dict:
    from trainer.export.safetensors_stream import StreamingSafetensorsWriter

    config = _model_config(source)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    specs = [s for s in source.reader.specs if not (tied and s.name == "lm_head.weight")]  # tied: one copy, HF re-ties

    def out_dtype(spec):
        return DTYPES[dtype] if dtype != "auto" and spec.dtype.is_floating_point else spec.dtype

    writer = StreamingSafetensorsWriter(out_dir, [(s.name, s.shape, out_dtype(s)) for s in specs], max_shard_bytes)
    _save_tokenizer(source, out_dir)  # everything but the weights first, so that the memory measured below is theirs
    _copy_generation_config(source, out_dir)
    rss_before = rss_bytes("VmRSS")
    for spec in specs:
        writer.write(spec.name, source.reader.read(spec))
    files = writer.close()
    floating = [out_dtype(s) for s in specs if s.dtype.is_floating_point]
    if floating:
        config.dtype = floating[0]  # what from_pretrained(dtype="auto") will load the weights as
    config.save_pretrained(out_dir)
    largest_read = max((s.numel * s.dtype.itemsize for s in specs), default=0)  # as read, before any conversion
    return {"tensors": len(specs), "bytes": writer.total_bytes, "files": files, "rss_before_bytes": rss_before,
            "largest_tensor_bytes": max(largest_read, writer.largest_tensor_bytes)}


def _model_config(source):
    from transformers import AutoConfig

    from trainer.model import load_model_config

    if source.kind == "final":  # the run's own model.trust_remote_code decides, as it did in training
        return AutoConfig.from_pretrained(source.location, trust_remote_code=source.config.model.trust_remote_code)
    return load_model_config(source.config.model)  # the architecture trained; the weights come from the checkpoint


def _copy_generation_config(source, out_dir: str) -> None:
    origin = source.location if source.kind == "final" else source.config.model.path
    path = os.path.join(origin or "", "generation_config.json")
    if origin and os.path.isfile(path):
        shutil.copy(path, os.path.join(out_dir, "generation_config.json"))


def _save_tokenizer(source, out_dir: str) -> None:
    from trainer.model import load_tokenizer

    if source.kind == "final":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(source.location, trust_remote_code=source.config.model.trust_remote_code
                                      ).save_pretrained(out_dir)
    else:
        load_tokenizer(source.config.model).save_pretrained(out_dir)  # as training used it (pad token included)


def write_adapter(source, out_dir: str, dtype: str) -> dict:
    """A PEFT adapter dir from the checkpoint's trainable weights (or a copy of final/'s adapter)."""
    from safetensors.torch import save_file

    if source.kind == "final":
        for name in os.listdir(source.location):
            shutil.copy(os.path.join(source.location, name), os.path.join(out_dir, name))
        tensors = {spec.name: spec for spec in source.reader.specs}
        largest = max((s.numel * s.dtype.itemsize for s in tensors.values()), default=0)
        return {"tensors": len(tensors), "bytes": sum(s.numel * s.dtype.itemsize for s in tensors.values()),
                "files": ["adapter_model.safetensors"], "largest_tensor_bytes": largest}
    from peft import get_peft_model_state_dict

    model = _meta_peft_model(source.config)
    trained = {}
    for spec in source.reader.specs:
        tensor = source.reader.read(spec)
        trained[spec.name] = tensor.to(DTYPES[dtype]) if dtype != "auto" and tensor.is_floating_point() else tensor
    state = get_peft_model_state_dict(model, state_dict=trained)  # PEFT's own saved names (adapter name dropped)
    if not state:
        raise UserError(f"{source.location} holds no adapter weights that PEFT recognises "
                        f"(peft={source.config.peft.name})")
    save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(out_dir, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    peft_config = model.peft_config["default"]
    peft_config.base_model_name_or_path = source.config.model.path
    peft_config.inference_mode = True
    peft_config.save_pretrained(out_dir)
    _save_tokenizer(source, out_dir)
    return {"tensors": len(state), "bytes": sum(v.numel() * v.element_size() for v in state.values()),
            "files": ["adapter_model.safetensors"],
            "largest_tensor_bytes": max((v.numel() * v.element_size() for v in state.values()), default=0)}


def _meta_peft_model(config):
    """The run's PEFT model with no weights allocated: PEFT's config and names come from it, exactly as trained."""
    from trainer.adapters import apply_peft
    from trainer.model import load_model

    return apply_peft(load_model(config.model, torch.float32, on_meta=True), config.peft)


def write_merged(source, out_dir: str, dtype: str) -> dict:
    """Adapter written to a scratch dir, then merged into the base by PEFT (trainer.adapters.merge_adapter)."""
    import tempfile

    from trainer.adapters import merge_adapter

    if not source.config.model.path:
        raise UserError("--to merged needs the base model's weights, but the run built its model from model.arch "
                        "(model.init=random): export --to adapter instead")
    precision = source.config.train.precision
    if dtype == "auto":  # the dtype the frozen base had in training, so the merged model computes what it computed
        dtype = precision if precision == "bf16" and source.config.peft.name != "qlora" else "fp32"
    with tempfile.TemporaryDirectory(dir=os.path.dirname(out_dir) or ".") as scratch:
        adapter_report = write_adapter(source, scratch, "auto")
        # merge_adapter reads QLoRA's quantisation settings from the run config beside the adapter
        shutil.copy(os.path.join(source.run_dir, "config.yaml"), os.path.join(scratch, "config.yaml"))
        merge_adapter(scratch, out_dir, base_path=source.config.model.path, dtype=dtype,
                      trust_remote_code=source.config.model.trust_remote_code)
    files = sorted(f for f in os.listdir(out_dir) if f.endswith(".safetensors"))
    total = sum(os.path.getsize(os.path.join(out_dir, f)) for f in files)
    return {"tensors": None, "bytes": total, "files": files, "adapter_tensors": adapter_report["tensors"],
            "largest_tensor_bytes": None}
