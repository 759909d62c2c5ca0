"""What a run was made from: code version, base model, data files, as RUN/lineage.json.

Written by rank 0 when training starts (and again on each resume, which may run other code), read by `trainer
register` (trainer/registry.py) so a registered model names exactly what produced it. Hashes are of content, not
paths or dates: the same file copied elsewhere hashes the same, an edited one does not.

A base model is identified by its config.json and its weight index (a sharded model's index.json, or the header of
a single safetensors file: names, shapes, dtypes, offsets), not by hashing every weight byte: hashing a 70B model
would add minutes to every start, and the index changes whenever the weight files do.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import time

LINEAGE_FILE = "lineage.json"
_CHUNK = 1 << 20


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _safetensors_header(path: str) -> bytes:
    """The JSON header of a safetensors file (8-byte little-endian length, then the header)."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return fh.read(min(size, 100 * _CHUNK))


def model_identity(path: str | None) -> dict:
    """{path, config_sha256, weights_index_sha256} of a local model dir; the path alone for a hub id or none."""
    if not path:
        return {"path": None}
    identity: dict = {"path": os.path.abspath(path) if os.path.isdir(path) else path}
    if not os.path.isdir(path):
        return identity
    config = os.path.join(path, "config.json")
    if os.path.isfile(config):
        identity["config_sha256"] = sha256_file(config)
    index = sorted(glob.glob(os.path.join(path, "*.safetensors.index.json")))
    singles = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if index:
        identity["weights_index_sha256"] = sha256_file(index[0])
    elif singles:
        digest = hashlib.sha256()
        for file in singles:
            digest.update(os.path.basename(file).encode() + b"\0" + _safetensors_header(file))
        identity["weights_index_sha256"] = digest.hexdigest()
    return identity


def _files_of(path: str) -> list[str]:
    """The local files a data path names (a file, a directory's files, a glob's matches); [] for a hub id."""
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    return sorted(p for p in glob.glob(path) if os.path.isfile(p))


def data_paths(config) -> dict[str, str]:
    """{config key: path} of every data input of a run (training, held-out, replay, forgetting, Fisher data)."""
    data = config.data
    paths = {"data.path": data.path, "data.val_path": data.val_path, "data.test_path": data.test_path,
             "data.replay.path": data.replay.path, "eval.forgetting_path": config.eval.forgetting_path,
             "regularize.fisher_path": config.regularize.fisher_path}
    for i, source in enumerate(data.sources):
        paths[f"data.sources.{i}.path"] = source.path
    return {key: value for key, value in paths.items() if value}


def data_identity(config) -> dict[str, dict]:
    """{config key: {path, files: {file: sha256}}}; a hub dataset id has no local files to hash."""
    identity = {}
    for key, path in data_paths(config).items():
        files = _files_of(path)
        identity[key] = {"path": path, "files": {os.path.abspath(f): sha256_file(f) for f in files}}
    return identity


def code_identity() -> dict:
    """The project's version, and its git commit when it runs from a checkout (dirty: uncommitted changes)."""
    from trainer import __version__

    identity: dict = {"version": __version__}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not os.path.exists(os.path.join(repo, ".git")):
        return identity
    try:
        commit = subprocess.run(["git", "-C", repo, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", repo, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on this machine: the version alone
        return identity
    if commit:
        identity.update(git_commit=commit, git_dirty=bool(dirty))
    return identity


def build_lineage(config, data_fingerprint: str | None) -> dict:
    return {"base_model": model_identity(config.model.path), "data": data_identity(config),
            "data_fingerprint": data_fingerprint, "code": code_identity()}


def write_lineage(run_dir: str, config, data_fingerprint: str | None) -> str:
    """RUN/lineage.json; each start of the run (first or resumed) is one entry of `starts`, with its code."""
    path = os.path.join(run_dir, LINEAGE_FILE)
    lineage = build_lineage(config, data_fingerprint)
    previous = read_lineage(run_dir) or {}
    starts = [*previous.get("starts", []), {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **lineage["code"]}]
    lineage["starts"] = starts
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(lineage, fh, indent=2)
    os.replace(tmp, path)
    return path


def read_lineage(run_dir: str) -> dict | None:
    path = os.path.join(run_dir, LINEAGE_FILE)
    if not os.path.isfile(path):
        return None
    from trainer.jsonfile import read_json

    return read_json(path)
