"""DeepSpeed ZeRO stages 1-3, with optimizer/parameter offload to CPU or NVMe.

The DeepSpeed JSON is generated from our config (batch sizes, accumulation, precision, clipping): one
source of truth. `strategy.deepspeed_overrides` may add keys; one that contradicts a value we derive is
an error naming both. Gradient accumulation is driven by our loop (DeepSpeed's unmanaged mode): every
micro batch calls backward, and the one `step()` per optimizer step is the accumulation boundary.
"""

from __future__ import annotations

from typing import Any, Iterator

from trainer.errors import ConfigError
from trainer.strategy.base import StrategyBase


def _offload_block(device: str, nvme_path: str | None) -> dict:
    block: dict[str, Any] = {"device": device, "pin_memory": True}
    if device == "nvme":
        block["nvme_path"] = nvme_path
    return block


def build_deepspeed_config(cfg, train_cfg, max_grad_norm: float, world_size: int) -> dict:
    """Our config -> DeepSpeed's JSON, then the user's overrides merged in (conflicts are errors)."""
    derived: dict[str, Any] = {
        "train_batch_size": train_cfg.global_batch_size,
        "train_micro_batch_size_per_gpu": train_cfg.micro_batch_size,
        "gradient_accumulation_steps": train_cfg.global_batch_size // (train_cfg.micro_batch_size * world_size),
        "gradient_clipping": max_grad_norm,
        "managed_gradient_accumulation": False,
        "bf16": {"enabled": train_cfg.precision == "bf16"},
        "fp16": {"enabled": train_cfg.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_optimization": {
            "stage": cfg.stage,
            "overlap_comm": cfg.overlap_comm,
            "contiguous_gradients": True,
            "stage3_gather_16bit_weights_on_model_save": cfg.stage == 3,
        },
        "steps_per_print": 10**9,  # progress is ours; DeepSpeed's own step prints would interleave
        "wall_clock_breakdown": False,
    }
    zero = derived["zero_optimization"]
    if cfg.offload_optimizer != "none":
        zero["offload_optimizer"] = _offload_block(cfg.offload_optimizer, cfg.nvme_path)
    if cfg.offload_param != "none":
        zero["offload_param"] = _offload_block(cfg.offload_param, cfg.nvme_path)
    return merge_overrides(derived, dict(cfg.deepspeed_overrides or {}))


def merge_overrides(derived: dict, overrides: dict, prefix: str = "") -> dict:
    merged = dict(derived)
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if key in derived and isinstance(derived[key], dict) and isinstance(value, dict):
            merged[key] = merge_overrides(derived[key], value, f"{path}.")
        elif key in derived and derived[key] != value:
            raise ConfigError(f"strategy.deepspeed_overrides.{path}",
                              f"{value!r} conflicts with {derived[key]!r}, which is derived from our config "
                              f"({_SOURCE_OF.get(path, 'the strategy')}); set it there instead")
        else:
            merged[key] = value
    return merged


_SOURCE_OF = {
    "train_batch_size": "train.global_batch_size",
    "train_micro_batch_size_per_gpu": "train.micro_batch_size",
    "gradient_accumulation_steps": "train.global_batch_size / (micro_batch_size x world size)",
    "gradient_clipping": "optim.max_grad_norm",
    "bf16.enabled": "train.precision", "fp16.enabled": "train.precision",
    "zero_optimization.stage": "strategy=zero1/zero2/zero3",
}


class DeepSpeedStrategy(StrategyBase):
    def __init__(self, cfg, train_cfg, optim_cfg):
        super().__init__(cfg, train_cfg, optim_cfg)
        import deepspeed

        # DeepSpeed's own comm layer must know the process group before any DeepSpeed config is parsed
        # (it reads the world size from it); it adopts the torch group that is already initialised.
        deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
        self.ds_config = build_deepspeed_config(cfg, train_cfg, optim_cfg.max_grad_norm, self.world_size)
        self._hf_ds_config = None
        self.engine = None

    def setup(self, build_model, build_optimizer):
        import deepspeed

        if self.cfg.stage == 3:
            # While this object lives, from_pretrained builds the model under deepspeed.zero.Init: each rank
            # allocates only its partition of the weights.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        model = build_model(all_in_compute_dtype=True)  # DeepSpeed keeps the fp32 master weights itself
        if self.train_cfg.gradient_checkpointing:
            from trainer.strategy.precision import apply_activation_checkpointing

            apply_activation_checkpointing(model, self.train_cfg.activation_offloading)
        optimizer = build_optimizer(model)
        if self.cfg.offload_optimizer != "none":
            optimizer = _to_cpu_adam(optimizer)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config,
                                                    dist_init_required=False)
        # Our LR scheduler drives the client optimizer's param_groups, which ZeRO's wrapper steps with.
        return self.engine, optimizer

    def autocast(self):
        import contextlib

        return contextlib.nullcontext()  # DeepSpeed runs the module in bf16/fp16 itself

    def backward(self, loss) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)  # the loop already divides by the global token count

    def step(self, model, optimizer, max_grad_norm: float) -> tuple[float, bool]:
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        self.engine.zero_grad()
        return float(norm if norm is not None else 0.0), bool(self.engine.was_step_applied())

    def unwrap(self, model):
        return model.module

    checkpoint_format = "deepspeed"
    supports_async_save = False

    @property
    def reshards_checkpoints(self) -> bool:
        """ZeRO partitions are tied to the world size that wrote them; on another one they load through DeepSpeed's
        universal checkpoint (converted at resume). Its loader has no path for NVMe-swapped optimizer state."""
        return "nvme" not in (self.cfg.offload_optimizer, self.cfg.offload_param)

    def save_state(self, model, optimizer, directory: str, async_save: bool = False):
        """DeepSpeed's own checkpoint (fp32 master partitions, optimizer state, its loss scaler), synchronously."""
        import os

        self.engine.save_checkpoint(os.path.dirname(directory), tag=os.path.basename(directory),
                                    exclude_frozen_parameters=True, save_latest=False)
        return None

    def load_state(self, model, optimizer, directory: str, saved_world_size: int | None = None,
                   scratch_dir: str | None = None) -> None:
        """DeepSpeed's own load. A checkpoint from another world size is first converted (once, by rank 0, into
        `scratch_dir`) to DeepSpeed's universal checkpoint, whose per-parameter files any world size can slice."""
        import os

        from trainer.export.checkpoint_reader import check_deepspeed_files

        check_deepspeed_files(directory)  # DeepSpeed unpickles these files: refuse any that could run code
        universal = saved_world_size is not None and saved_world_size != self.world_size
        if universal:
            from trainer.errors import UserError
            from trainer.strategy.universal import STATE, convert_to_universal

            if scratch_dir is None:
                raise ValueError("a checkpoint from another world size needs a scratch dir for its universal form")
            failure = None
            if self.is_main:
                try:
                    convert_to_universal(directory, scratch_dir)
                except Exception as err:  # every rank must learn of it, or the others would wait at the barrier
                    failure = err
            if self.all_reduce_max(1.0 if failure else 0.0) > 0:
                raise failure or UserError(f"rank 0 could not convert {directory} for this world size (see its error)")
            directory = os.path.join(scratch_dir, STATE)
        self.engine._config.load_universal_checkpoint = universal  # read by every load step; no public setter
        try:
            self.engine.load_checkpoint(os.path.dirname(directory), tag=os.path.basename(directory),
                                        load_optimizer_states=True, load_lr_scheduler_states=False,
                                        load_module_strict=False)
        finally:
            self.engine._config.load_universal_checkpoint = False

    def iter_full_state(self, model, trainable_only: bool) -> Iterator[tuple[str, object]]:
        """ZeRO-3 holds each parameter in pieces: gather one parameter at a time onto every rank, copy on rank 0."""
        if self.cfg.stage != 3:
            yield from super().iter_full_state(model, trainable_only)
            return
        import deepspeed

        inner = self.unwrap(model)
        for name, param in inner.named_parameters():
            if trainable_only and not param.requires_grad:
                continue
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                yield name, (param.detach().cpu().clone() if self.is_main else None)
        if not trainable_only:
            persistent = set(inner.state_dict().keys())
            for name, buf in inner.named_buffers():
                if name in persistent:
                    yield name, (buf.detach().cpu() if self.is_main else None)


    def local_state_bytes(self, model, optimizer) -> dict:
        """As the base, plus DeepSpeed's own fp32 master partitions, which live in its optimizer wrapper
        (in fp32 training ZeRO-3 uses the parameter partitions themselves as masters: not counted twice)."""
        from trainer.strategy.base import storage_ptr, tensor_bytes

        counts = super().local_state_bytes(model, optimizer)
        wrapper = self.engine.optimizer
        masters = getattr(wrapper, "fp32_partitioned_groups_flat", None) or getattr(
            wrapper, "single_partition_of_fp32_groups", None) or []
        param_storages = frozenset(storage_ptr(p) for p in model.parameters())
        counts["optimizer"] += tensor_bytes(list(masters), skip_storages=param_storages)
        grad_partitions = getattr(wrapper, "grad_partitions_flat_buffer", None)  # ZeRO-3 keeps gradients here
        if grad_partitions is not None:
            counts["grads"] = tensor_bytes(grad_partitions)
        return counts


def _to_cpu_adam(optimizer):
    """ZeRO-Offload steps the optimizer on the CPU: DeepSpeed's vectorised CPU Adam (JIT-built once, cached)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    defaults = optimizer.defaults
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups]
    return DeepSpeedCPUAdam(groups, lr=defaults["lr"], betas=defaults["betas"], eps=defaults["eps"],
                            weight_decay=defaults["weight_decay"], adamw_mode=True)
