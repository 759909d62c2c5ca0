"""FSDP2 (`fully_shard`): parameters, gradients and optimizer state sharded over ranks.

Each decoder layer is its own shard group (so only one layer is gathered at a time), then the root.
Only rank 0 reads the weights; the other ranks build the model on the meta device and receive their
shards by broadcast, so a 70B model never needs one full copy per rank in host memory.
"""

from __future__ import annotations

from trainer.strategy.base import StrategyBase
from trainer.strategy.precision import clip_and_step


def decoder_layers(model) -> list:
    """The modules to shard one by one: those whose class the model lists as not to be split (HF convention)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find decoder layers to shard in {type(base).__name__}: it declares no "
                         "_no_split_modules; use strategy=ddp or a DeepSpeed strategy")
    return layers


class FSDPStrategy(StrategyBase):
    def setup(self, build_model, build_optimizer):
        import torch
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        model = build_model(on_meta=not self.is_main)
        buffers = {name: buf.detach().clone() for name, buf in model.named_buffers()}  # real on every rank
        full_state = model.state_dict() if self.is_main else {}
        if self.train_cfg.gradient_checkpointing:
            apply_layer_checkpointing(model)
            if self.train_cfg.activation_offloading:
                from trainer.activation_offload import offload_checkpointed_inputs

                offload_checkpointed_inputs(model)
        compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        options = {
            "mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
            "reshard_after_forward": self.cfg.reshard_after_forward,
        }
        if self.cfg.cpu_offload:
            # Pinned host memory speeds up the copies to a GPU; without one there is nothing to pin for (and pinning
            # needs an accelerator), so a CPU-only run offloads to plain memory.
            options["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
        for layer in decoder_layers(model):
            fully_shard(layer, **options)
        fully_shard(model, **options)
        # The root (embedding, final norm, lm_head) stays gathered from the forward to its backward, as FSDP2 does by
        # default for a root: the loss (trainer/objectives/) calls lm_head after the model's forward, chunk by chunk,
        # and backward would gather it again at once. reshard_after_forward applies to the decoder layers.
        model.set_reshard_after_forward(False, recurse=False)
        self._materialize(model, full_state, buffers)
        del full_state
        self.compile_if_asked(model)  # after sharding: FSDP2's hooks stay outside the compiled layers
        return model, build_optimizer(model)

    def _materialize(self, model, full_state: dict, buffers: dict) -> None:
        """Allocate the local shards, fill them from rank 0's weights, and restore non-persistent buffers."""
        import torch
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        model.to_empty(device="cpu" if self.cfg.cpu_offload else self.device)
        options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
        set_model_state_dict(model, full_state, options=options)
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name in buffers:
                    buf.copy_(buffers[name].to(buf.device))

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # the mixed-precision policy casts parameters for compute

    def microbatch(self, model, is_last: bool):
        import contextlib

        # Reduce-scatter gradients only with the last micro batch of a step.
        model.set_requires_gradient_sync(is_last)
        return contextlib.nullcontext()

    def backward(self, loss) -> None:
        loss.backward()

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        return clip_and_step(optimizer, max_grad_norm)


def apply_layer_checkpointing(model) -> None:
    """Wrap each decoder layer so its activations are recomputed in backward (applied before sharding)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        apply_activation_checkpointing,
        checkpoint_wrapper,
    )

    layer_types = tuple({type(layer) for layer in decoder_layers(model)})
    apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
        check_fn=lambda m: isinstance(m, layer_types))
