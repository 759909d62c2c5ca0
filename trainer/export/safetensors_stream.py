"""Write safetensors files whose layout is planned before any tensor is read: memory holds one tensor at a time.

A safetensors file is an 8-byte header length, a JSON header giving every tensor's dtype, shape and byte range,
then the raw bytes. The readers list every tensor's name, shape and dtype up front, so the headers (and the split
into shards of at most `max_shard_bytes`) are known first; each tensor is then read, converted and appended to its
shard as it arrives and dropped. (Packing tensors into an in-memory shard before writing, as `trainer.weights`
does for final/, would hold a whole shard instead.) Files are written as `*.part` and renamed when complete.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field

import torch

SAFETENSORS_DTYPE = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                     torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
                     torch.bool: "BOOL"}


@dataclass
class PlannedShard:
    file_name: str
    entries: list = field(default_factory=list)  # (name, shape, dtype, begin, end), in write order
    nbytes: int = 0


def plan_shards(specs: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int,
                base_name: str) -> list[PlannedShard]:
    """Assign tensors to shards in the given order (so sources are read front to back)."""
    shards: list[PlannedShard] = []
    for name, shape, dtype in specs:
        nbytes = _numel(shape) * torch.empty((), dtype=dtype).element_size()
        if not shards or (shards[-1].entries and shards[-1].nbytes + nbytes > max_shard_bytes):
            shards.append(PlannedShard(""))
        shard = shards[-1]
        shard.entries.append((name, tuple(shape), dtype, shard.nbytes, shard.nbytes + nbytes))
        shard.nbytes += nbytes
    stem, suffix = base_name.rsplit(".", 1)
    for i, shard in enumerate(shards, start=1):
        shard.file_name = base_name if len(shards) == 1 else f"{stem}-{i:05d}-of-{len(shards):05d}.{suffix}"
    return shards


def _numel(shape) -> int:
    count = 1
    for size in shape:
        count *= int(size)
    return count


def _header(shard: PlannedShard, metadata: dict) -> bytes:
    header = {"__metadata__": metadata}
    for name, shape, dtype, begin, end in shard.entries:
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [begin, end]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format aligns the data on 8 bytes; spaces are valid JSON padding
    return struct.pack("<Q", len(raw)) + raw


class StreamingSafetensorsWriter:
    """Usage: `writer = StreamingSafetensorsWriter(out_dir, specs, ...)`, then `writer.write(name, tensor)` for every
    planned tensor in plan order, then `writer.close()` (renames the files, writes the index if sharded)."""

    def __init__(self, out_dir: str, specs: list[tuple[str, tuple, torch.dtype]], max_shard_bytes: int,
                 base_name: str = "model.safetensors", index_name: str | None = "model.safetensors.index.json"):
        self.out_dir = out_dir
        self.shards = plan_shards(specs, max_shard_bytes, base_name)
        self.index_name = index_name
        self._order = [(shard, entry) for shard in self.shards for entry in shard.entries]
        self._next = 0
        self._handle = None
        self._current: PlannedShard | None = None
        self.total_bytes = sum(shard.nbytes for shard in self.shards)
        self.largest_tensor_bytes = max((e[4] - e[3] for _, e in self._order), default=0)

    @property
    def pending_names(self) -> list[str]:
        return [entry[0] for _, entry in self._order[self._next:]]

    def write(self, name: str, tensor) -> None:
        shard, (planned, shape, dtype, begin, end) = self._order[self._next]
        if name != planned:
            raise ValueError(f"expected tensor {planned!r} next, got {name!r}")
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} differs from the planned {shape}")
        if shard is not self._current:
            self._open(shard)
        data = tensor.detach().to(device="cpu", dtype=dtype).contiguous().reshape(-1).view(torch.uint8)
        self._handle.write(memoryview(data.numpy()))  # no extra copy of the bytes
        self._next += 1

    def _open(self, shard: PlannedShard) -> None:
        self._finish_file()
        self._current = shard
        self._handle = open(os.path.join(self.out_dir, shard.file_name + ".part"), "wb")
        self._handle.write(_header(shard, {"format": "pt"}))

    def _finish_file(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self._handle = None

    def close(self) -> list[str]:
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} planned tensors were never written "
                             f"(first: {self._order[self._next][1][0]})")
        self._finish_file()
        for shard in self.shards:
            part = os.path.join(self.out_dir, shard.file_name + ".part")
            os.replace(part, os.path.join(self.out_dir, shard.file_name))
        if len(self.shards) > 1 and self.index_name:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {entry[0]: shard.file_name for shard in self.shards for entry in shard.entries}}
            with open(os.path.join(self.out_dir, self.index_name), "w") as fh:
                json.dump(index, fh, indent=2)
        return [shard.file_name for shard in self.shards]
