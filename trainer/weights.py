"""Write Hugging Face weights tensor by tensor: safetensors shards plus an index, memory bounded by one shard.

Used for `final/` and by exports, so no process ever needs the whole model in memory at once: tensors
arrive one at a time (gathered from shards by the strategy) and are flushed to a shard file as soon as
it reaches `max_shard_bytes`.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator

from trainer.errors import UserError

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"


class ShardedSafetensorsWriter:
    def __init__(self, out_dir: str, max_shard_bytes: int = 4 * 1024**3, metadata: dict | None = None):
        self.out_dir = out_dir
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        self.pending: dict = {}
        self.pending_bytes = 0
        self.shard_files: list[str] = []
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0

    def add(self, name: str, tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().cpu()
        self.pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-{len(self.shard_files) + 1:05d}.safetensors.part"
        save_file(self.pending, os.path.join(self.out_dir, name), metadata=self.metadata)
        self.shard_files.append(name)
        for key in self.pending:
            self.weight_map[key] = name
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Name the shards `model-0000i-of-0000n.safetensors` (or `model.safetensors` if one) and write the index."""
        if self.pending or not self.shard_files:
            self._flush()
        count = len(self.shard_files)
        final_names = {}
        for i, part in enumerate(self.shard_files, start=1):
            final = WEIGHTS_NAME if count == 1 else f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(os.path.join(self.out_dir, part), os.path.join(self.out_dir, final))
            final_names[part] = final
        if count > 1:
            index = {"metadata": {"total_size": self.total_bytes},
                     "weight_map": {k: final_names[v] for k, v in sorted(self.weight_map.items())}}
            with open(os.path.join(self.out_dir, INDEX_NAME), "w") as fh:
                json.dump(index, fh, indent=2)
        return list(final_names.values())


def write_safetensors_stream(tensors: Iterable[tuple[str, object]], out_dir: str,
                             max_shard_bytes: int = 4 * 1024**3) -> list[str]:
    writer = ShardedSafetensorsWriter(out_dir, max_shard_bytes)
    for name, tensor in tensors:
        writer.add(name, tensor)
    return writer.close()


def indexed_weight_files(model_dir: str) -> list[str] | None:
    """The shard files a sharded model's index names (sorted), or None when the model is not sharded."""
    from trainer.jsonfile import read_json

    index_path = os.path.join(model_dir, INDEX_NAME)
    if not os.path.exists(index_path):
        return None
    index = read_json(index_path)
    if not isinstance(index, dict) or not isinstance(index.get("weight_map"), dict):
        raise UserError(f"{index_path}: has no weight_map; the index is damaged (a complete one maps every tensor "
                        "to its shard file)")
    return sorted(set(index["weight_map"].values()))


def iter_safetensors(model_dir: str) -> Iterator[tuple[str, object]]:
    """Read a (possibly sharded) safetensors model back one tensor at a time, without unpickling anything."""
    from safetensors import safe_open

    for file in indexed_weight_files(model_dir) or [WEIGHTS_NAME]:
        with safe_open(os.path.join(model_dir, file), framework="pt") as handle:
            for key in handle.keys():
                yield key, handle.get_tensor(key)


def safetensors_shapes(directory: str, files: list[str] | None = None) -> dict[str, tuple]:
    """{tensor name: shape} of a (possibly sharded) safetensors model or adapter, from the headers alone."""
    from safetensors import safe_open

    shapes = {}
    for file in files or indexed_weight_files(directory) or [WEIGHTS_NAME]:
        with safe_open(os.path.join(directory, file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return shapes


def first_shape_mismatch(found: dict, expected: dict) -> str | None:
    """The first tensor whose shape in a file (`found`) differs from the shape its config gives (`expected`)."""
    for name, shape in found.items():
        if name in expected and tuple(expected[name]) != tuple(shape):
            return f"{name} is {list(shape)} in the file, {list(expected[name])} by the config"
    return None


def check_safetensors_files(directory: str) -> None:
    """Every *.safetensors file in `directory` must be as long as its header says: a truncated or cut file (a copy
    that stopped, a full disk) is one line naming it, not a traceback from deep inside a loader."""
    import struct

    for name in sorted(os.listdir(directory)):
        if not name.endswith(".safetensors"):
            continue
        path = os.path.join(directory, name)
        size = os.path.getsize(path)
        problem = None
        try:
            with open(path, "rb") as fh:
                head = fh.read(8)
                header_len = struct.unpack("<Q", head)[0] if len(head) == 8 else None
                header = json.loads(fh.read(header_len)) if header_len is not None and 8 + header_len <= size else None
        except (OSError, ValueError, struct.error):
            header = None
        if header is None:
            problem = f"{size} bytes, not even a whole safetensors header"
        else:
            ends = [entry["data_offsets"][1] for key, entry in header.items()
                    if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
            expected = 8 + header_len + max(ends, default=0)
            if size != expected:
                problem = f"{size} bytes where its header describes {expected}"
        if problem:
            raise UserError(f"{path} is truncated or damaged ({problem}): restore it, or write it again (`trainer "
                            "export` from a checkpoint, or train the run again)")


def apply_umask(directory: str) -> None:
    """Give every file under DIRECTORY the permissions the user's umask asks for (0644 under umask 022).

    safetensors writes its files with mode 0600 (an atomic temp file), so a model that a team shares on a cluster
    filesystem would be readable by its writer alone; the other files of the same dir follow the umask."""
    mask = os.umask(0)
    os.umask(mask)
    for root, dirs, files in os.walk(directory):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
