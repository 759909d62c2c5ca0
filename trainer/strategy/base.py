"""What every strategy shares: rank and device bookkeeping, precision, reductions, and DCP state.

Concrete strategies add only what differs: how the model is built and wrapped, how gradients are
synchronised, and (DeepSpeed) how state is saved.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Iterator

from trainer.strategy.env import (
    DistEnv,
    all_reduce_max,
    all_reduce_sum,
    barrier,
    destroy_process_group,
    init_process_group,
    read_dist_env,
)
from trainer.strategy.precision import autocast_context


class StrategyBase:
    def __init__(self, cfg, train_cfg, optim_cfg, dist_env: DistEnv | None = None):
        self.cfg = cfg
        self.train_cfg = train_cfg
        self.optim_cfg = optim_cfg
        self.dist_env = dist_env or read_dist_env()
        self.rank = self.dist_env.rank
        self.world_size = self.dist_env.world_size
        self.device = init_process_group(self.dist_env, getattr(cfg, "timeout_s", 1800))
        self.precision = train_cfg.precision
        self.compiled_layers = 0  # train.compile: how many decoder layers compile_if_asked compiled

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def loss_multiplier(self) -> float:
        # DDP, FSDP and DeepSpeed average gradients over ranks; the loop already divides by the global token
        # count, so multiplying by the world size turns their mean back into the sum we want.
        return float(self.world_size)

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def compile_if_asked(self, model) -> None:
        """train.compile: compile the decoder layers in place (trainer/strategy/compile.py)."""
        if getattr(self.train_cfg, "compile", False):
            from trainer.strategy.compile import compile_decoder_layers

            self.compiled_layers = compile_decoder_layers(model)

    def microbatch(self, model, is_last: bool):
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: float) -> float:
        return all_reduce_sum(value, self.device)

    def all_reduce_max(self, value: float) -> float:
        return all_reduce_max(value, self.device)

    def barrier(self) -> None:
        barrier()

    def unwrap(self, model):
        return model

    def close(self) -> None:
        destroy_process_group()

    # ----------------------------------------------------------------------------------------- state
    checkpoint_format = "dcp"  # recorded in trainer_state.json: which strategies can read a checkpoint
    reshards_checkpoints = True  # DCP re-slices saved shards for any world size
    supports_async_save = True

    def save_state(self, model, optimizer, directory: str, async_save: bool = False):
        """Model (trainable weights only) and optimizer through DCP: every rank writes its own shards.

        With `async_save` the state is first copied to host memory (so training may change the weights at once)
        and written by a background thread; the returned future completes when this rank's files are written."""
        import torch.distributed.checkpoint as dcp

        state = self._dcp_state(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns when it runs without a process group (one rank)
            if not async_save:
                dcp.save(state, checkpoint_id=directory)
                return None
            return dcp.async_save(state, checkpoint_id=directory, process_group=self._checkpoint_group())

    def _checkpoint_group(self):
        """A gloo group for background saves: their collectives must not interleave with training's on the default
        group (and NCCL cannot move host-memory tensors). Created once, by every rank at the same save."""
        import torch.distributed as dist

        if not dist.is_initialized():
            return None
        if getattr(self, "_async_group", None) is None:
            self._async_group = dist.new_group(backend="gloo")
        return self._async_group

    def load_state(self, model, optimizer, directory: str, saved_world_size: int | None = None,
                   scratch_dir: str | None = None) -> None:
        """DCP reshards for any world size by itself: `saved_world_size` and `scratch_dir` are not needed."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from trainer.export.checkpoint_reader import SafeFileSystemReader

        state = self._dcp_state(model, optimizer)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The metadata file is a pickle: read it with an unpickler that only builds DCP's own metadata types.
            reader = SafeFileSystemReader(directory)
            # Read here first (it is read once, then reused): a refused metadata pickle is then this rank's one-line
            # UserError, not an exception DCP gathers from every rank into a CheckpointException of tracebacks.
            reader.read_metadata()
            dcp.load(state, storage_reader=reader)
        # strict=False: the checkpoint holds only trainable weights (LoRA adapters), so the frozen base weights are
        # "missing" by design; dcp.load above already failed on any trainable key the checkpoint lacks.
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(ignore_frozen_params=True, strict=False))

    def scaler_state_dict(self) -> dict | None:
        """fp16's dynamic loss scale (and its growth counter), so a resumed run scales exactly as it would have."""
        scaler = getattr(self, "scaler", None)
        return scaler.state_dict() if scaler is not None else None

    def load_scaler_state_dict(self, state: dict | None) -> None:
        scaler = getattr(self, "scaler", None)
        if scaler is not None and state:
            scaler.load_state_dict(state)

    @staticmethod
    def _dcp_state(model, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer, options=StateDictOptions(ignore_frozen_params=True))
        return {"model": model_state, "optimizer": optim_state}

    def iter_full_state(self, model, trainable_only: bool) -> Iterator[tuple[str, object]]:
        """(name, full tensor) pairs in the unwrapped model's naming, one at a time; tensors are None off rank 0.
        Every rank must iterate (gathering sharded tensors is collective)."""
        inner = self.unwrap(model)
        trainable = {name for name, p in inner.named_parameters() if p.requires_grad}
        for name, tensor in inner.state_dict().items():
            if trainable_only and name not in trainable:
                continue
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()  # a DTensor shard (FSDP2): gather this one tensor
            yield name, (tensor.detach().cpu() if self.is_main else None)

    # --------------------------------------------------------------------------------------- memory
    def local_state_bytes(self, model, optimizer) -> dict:
        """Bytes this rank holds for parameters, gradients (fp32, as at the optimizer step) and optimizer
        state: the model states that sharding divides. Activations are not included."""
        params = grads = 0
        for param in model.parameters():
            local = _local_tensor(param)
            params += local.numel() * local.element_size()
            if param.requires_grad:
                grads += local.numel() * 4
        return {"params": params, "grads": grads, "optimizer": tensor_bytes(optimizer.state)}


def _local_tensor(tensor):
    if hasattr(tensor, "to_local"):
        return tensor.to_local()  # an FSDP2 shard (DTensor)
    if hasattr(tensor, "ds_tensor"):
        return tensor.ds_tensor  # a ZeRO-3 partition
    return tensor


def storage_ptr(tensor) -> int:
    return _local_tensor(tensor).untyped_storage().data_ptr()


def tensor_bytes(value, skip_storages: frozenset = frozenset()) -> int:
    """Bytes of the local parts of all tensors in a nested state, skipping tensors that share listed storages."""
    import torch

    if isinstance(value, torch.Tensor):
        local = _local_tensor(value)
        return 0 if storage_ptr(local) in skip_storages else local.numel() * local.element_size()
    if isinstance(value, dict):
        return sum(tensor_bytes(v, skip_storages) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v, skip_storages) for v in value)
    return 0
