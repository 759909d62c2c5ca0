"""Read trained weights out of a checkpoint one tensor at a time, without ever unpickling code.

Three layouts hold weights: torch.distributed.checkpoint (single/DDP/FSDP2, written at any world size),
DeepSpeed ZeRO 1-3 (fp32 master partitions per rank), and a run's `final/` (safetensors). Each reader lists
`TensorSpec`s (name, shape, dtype) up front, so a writer can lay out its files before any data is read, then
`read(name)` assembles that one tensor from however many shards hold it. Memory is bounded by the largest
tensor, never the model.

Safety: DCP's `.metadata` is a pickle, read here by an unpickler that builds only DCP's own metadata types; DCP's
non-tensor items go through `torch.load(weights_only=True)`. DeepSpeed's files load with `weights_only=True` and
`mmap=True`, its three small bookkeeping classes replaced by an inert stand-in; before DeepSpeed itself loads a
checkpoint to resume, `check_deepspeed_files` refuses any file whose pickle names another global.
"""

from __future__ import annotations

import io
import os
import pickle
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from trainer.errors import UserError
from trainer.weights import indexed_weight_files

# -------------------------------------------------------------------------------------------------- DCP
_DCP_METADATA_GLOBALS = {
    ("torch.distributed.checkpoint.metadata", name) for name in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if (module, name) in _DCP_METADATA_GLOBALS or is_dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}: it is not part of DCP metadata")


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a metadata unpickler that cannot run code (and the metadata read once)."""

    _metadata = None

    def read_metadata(self, *args, **kwargs):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if self._metadata is None:
            rank = kwargs.get("rank")
            path = os.path.join(str(self.path), ".metadata" if rank is None else f"__{rank}.metadata")
            try:
                with open(path, "rb") as fh:
                    self._metadata = _MetadataUnpickler(fh).load()
            except pickle.UnpicklingError as err:
                raise UserError(f"{path}: {err}") from None
            if getattr(self._metadata, "storage_meta", None) is None:
                self._metadata.storage_meta = StorageMeta()
        self._metadata.storage_meta.load_id = self.load_id
        return self._metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """Non-tensor items (optimizer hyper-parameters) are small pickles too: load them with weights_only."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        from torch.distributed.checkpoint._traverse import set_element  # what DefaultLoadPlanner itself uses

        loaded = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], loaded)
        else:
            self.state_dict[read_item.dest_index.fqn] = loaded


@dataclass(frozen=True)
class TensorSpec:
    name: str  # the model's own naming: Hugging Face's for a full model, PEFT's in-memory one for adapters
    shape: tuple
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count


class DcpReader:
    """The model's tensors of a DCP checkpoint (`step-N/state`), whatever world size wrote it."""

    def __init__(self, state_dir: str):
        import torch.distributed.checkpoint as dcp

        self._dcp = dcp
        self.state_dir = state_dir
        self.reader = SafeFileSystemReader(state_dir)
        metadata = self.reader.read_metadata()
        self._keys: dict[str, str] = {}  # exported name -> DCP key
        self.specs: list[TensorSpec] = []
        for key, item in metadata.state_dict_metadata.items():
            if not key.startswith("model.") or not hasattr(item, "size"):
                continue
            name = key[len("model."):]  # the saved state is {"model": ..., "optimizer": ...}, flattened
            self._keys[name] = key
            self.specs.append(TensorSpec(name, tuple(item.size), item.properties.dtype))

    def read(self, spec: TensorSpec):
        import warnings

        tensor = torch.empty(spec.shape, dtype=spec.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._dcp.load({self._keys[spec.name]: tensor}, storage_reader=self.reader, planner=SafeLoadPlanner(),
                           no_dist=True)
        return tensor


# --------------------------------------------------------------------------------------------- DeepSpeed
class _Opaque:
    """Stands in for DeepSpeed's bookkeeping objects (loss scaler, stage enum, fragment address) while unpickling:
    it only stores what it is given, so nothing in the file can make it run code."""

    def __init__(self, *args, **kwargs):
        self.args = args

    def __setstate__(self, state):
        self.state = state


_DEEPSPEED_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler", "deepspeed.runtime.zero.config.ZeroStageEnum",
                      "deepspeed.utils.tensor_fragment.fragment_address")


def _load_deepspeed_file(path: str) -> dict:
    with torch.serialization.safe_globals([(_Opaque, name) for name in _DEEPSPEED_GLOBALS]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except pickle.UnpicklingError as err:
            raise UserError(f"{path}: refusing to load it: {str(err).splitlines()[0]}") from None


def check_deepspeed_files(state_dir: str) -> None:
    """Refuse a DeepSpeed checkpoint whose pickles name any global beyond DeepSpeed's known bookkeeping classes
    (DeepSpeed's loader unpickles without restriction, so this check stands between it and foreign files)."""
    for name in sorted(os.listdir(state_dir)):
        if name.endswith(".pt"):
            unknown = set(torch.serialization.get_unsafe_globals_in_checkpoint(os.path.join(state_dir, name)))
            unknown -= set(_DEEPSPEED_GLOBALS)
            if unknown:
                raise UserError(f"{os.path.join(state_dir, name)} references {sorted(unknown)[0]}, which no DeepSpeed "
                                "checkpoint written by this trainer contains: refusing to load it")


class DeepSpeedReader:
    """Full fp32 weights reassembled from ZeRO partitions. Stage 1/2: each parameter group is one flat vector
    split evenly over ranks, parameters laid end to end (plus DeepSpeed's alignment padding). Stage 3: every
    parameter is split on its own, each rank holding ceil(numel / world) elements of it, back to back."""

    def __init__(self, state_dir: str):
        files = sorted(os.listdir(state_dir))
        optim_files = [f for f in files if f.endswith("optim_states.pt")]
        if not optim_files:
            raise UserError(f"{state_dir} holds no DeepSpeed optimizer partitions (*optim_states.pt)")
        self.world_size = len(optim_files)
        self.optim = [_load_deepspeed_file(os.path.join(state_dir, f))["optimizer_state_dict"]
                      for f in sorted(optim_files, key=_rank_of)]
        model_file = "mp_rank_00_model_states.pt" if "mp_rank_00_model_states.pt" in files else \
            "zero_pp_rank_0_mp_rank_00_model_states.pt"
        model_states = _load_deepspeed_file(os.path.join(state_dir, model_file))
        self.stage = int(self.optim[0]["zero_stage"].args[0])
        self._locations: dict[str, tuple] = {}  # name -> where its pieces lie
        self.specs: list[TensorSpec] = []
        if self.stage == 3:
            self._index_stage3(model_states["param_shapes"])
        else:
            self._index_stage12(model_states["param_shapes"])
        module = model_states.get("module") or {}
        for name in model_states.get("buffer_names") or []:  # persistent buffers travel in the module state
            if name in module:
                self._add(name, tuple(module[name].shape), ("buffer", module[name]))

    def _add(self, name: str, shape: tuple, location: tuple) -> None:
        self._locations[name] = location
        self.specs.append(TensorSpec(name, shape, torch.float32 if location[0] != "buffer" else location[1].dtype))

    def _index_stage12(self, param_shapes: list) -> None:
        paddings = self.optim[0].get("param_alignment_paddings")
        for group, shapes in enumerate(param_shapes):
            offset = 0
            for i, (name, shape) in enumerate(shapes.items()):
                numel = _numel(shape)
                self._add(name, tuple(shape), ("flat", group, offset, numel))
                offset += numel + (paddings[group][i] if paddings else 0)

    def _index_stage3(self, param_shapes: list) -> None:
        offset = 0
        for shapes in param_shapes:
            for name, shape in shapes.items():
                numel = _numel(shape)
                per_rank = -(-numel // self.world_size)
                self._add(name, tuple(shape), ("split", offset, per_rank, numel))
                offset += per_rank

    def read(self, spec: TensorSpec):
        location = self._locations[spec.name]
        if location[0] == "buffer":
            return location[1].clone()
        if location[0] == "split":
            _, offset, per_rank, numel = location
            pieces = [piece for rank in range(self.world_size)
                      for piece in _slices(self.optim[rank]["fp32_flat_groups"], offset, per_rank)]
            return torch.cat(pieces)[:numel].view(spec.shape)  # cat copies out of the mapped file
        _, group, offset, numel = location
        pieces = _slices([o["single_partition_of_fp32_groups"][group] for o in self.optim], offset, numel)
        return torch.cat(pieces).view(spec.shape)


def _slices(vectors: list, offset: int, length: int) -> list:
    """Views of [offset, offset + length) of the vectors laid end to end (a parameter may straddle two ranks'
    partitions at stage 1/2, or two sub-groups of one rank at stage 3). Nothing is copied until the caller cats."""
    pieces, position, end, start_of = [], offset, offset + length, 0
    for vector in vectors:
        size = vector.numel()
        if position < start_of + size and position < end:
            take = min(end, start_of + size) - position
            pieces.append(vector[position - start_of:position - start_of + take])
            position += take
        start_of += size
    if position != end:
        raise UserError(f"the DeepSpeed checkpoint is shorter than its parameter list says ({end - position} "
                        "elements missing): it is damaged or from another DeepSpeed layout")
    return pieces


def _rank_of(file_name: str) -> int:
    return int(file_name.split("zero_pp_rank_")[1].split("_")[0])


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


# ----------------------------------------------------------------------------------------------- final/
class SafetensorsReader:
    """A Hugging Face model or PEFT adapter dir (the run's `final/`), read lazily from its safetensors files."""

    def __init__(self, directory: str):

        from safetensors import safe_open

        self.directory = directory
        files = indexed_weight_files(directory)
        if files is None:
            files = [f for f in ("model.safetensors", "adapter_model.safetensors")
                     if os.path.exists(os.path.join(directory, f))]
        if not files:
            raise UserError(f"{directory} holds no model.safetensors or adapter_model.safetensors")
        self._files: dict[str, str] = {}
        self.specs: list[TensorSpec] = []
        for file in files:
            with safe_open(os.path.join(directory, file), framework="pt") as handle:
                for key in handle.keys():
                    piece = handle.get_slice(key)
                    self._files[key] = file
                    self.specs.append(TensorSpec(key, tuple(piece.get_shape()), _SAFETENSORS_DTYPES[piece.get_dtype()]))

    def read(self, spec: TensorSpec):
        from safetensors import safe_open

        with safe_open(os.path.join(self.directory, self._files[spec.name]), framework="pt") as handle:
            return handle.get_tensor(spec.name)


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}
