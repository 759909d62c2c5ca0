"""The tokenised-data cache: tokenise once per data + tokenizer + template + length + format options.

Entries live in `<paths.cache_dir>/data/<fingerprint>/`. The first process to take the entry's file lock
builds it while every other process (other ranks, other nodes on a shared file system) waits on that lock,
not on a collective that can time out, then loads what was built. An entry is written into a temporary
directory and renamed into place in one step, so an error or a kill leaves no half-written entry; a
leftover temporary directory is removed by the next builder. Arrays are memory-mapped on load, so ranks on
one node share one copy in the page cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from typing import Callable

# Bump when the pipeline's output for the same inputs changes (formatting, masking, encoding).
CACHE_VERSION = 2  # 2: a sample is tokenised as one text (encode.py)
META_FILE = "meta.json"
LOCK_WAIT_NOTICE_S = 10.0


def fingerprint(parts: dict) -> str:
    from trainer import __version__

    blob = json.dumps({"cache_version": CACHE_VERSION, "trainer": __version__, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:24]


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges, normalisation and special tokens: everything that changes the ids a text gets."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    extra = [type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
             getattr(tokenizer, "chat_template", None), list(getattr(tokenizer, "all_special_tokens", []))]
    return hashlib.sha256((body + json.dumps(extra, default=str)).encode("utf-8")).hexdigest()


class TokenCache:
    """One cache entry: named numpy arrays plus a JSON `meta` dict."""

    def __init__(self, cache_dir: str, key: str):
        self.root = os.path.join(cache_dir, "data")
        self.key = key
        self.path = os.path.join(self.root, key)

    def load(self) -> tuple[dict, dict] | None:
        import numpy as np

        meta_path = os.path.join(self.path, META_FILE)
        if not os.path.isfile(meta_path):
            return None
        with open(meta_path) as fh:
            meta = json.load(fh)
        arrays = {name: np.load(os.path.join(self.path, f"{name}.npy"), mmap_mode="r") for name in meta["arrays"]}
        return arrays, meta["meta"]

    def get_or_build(self, build: Callable[[], tuple[dict, dict]]) -> tuple[dict, dict, bool]:
        """(arrays, meta, built): load the entry, or build and store it under the lock if nobody has yet."""
        from filelock import FileLock, Timeout

        found = self.load()
        if found is not None:
            return (*found, False)
        os.makedirs(self.root, exist_ok=True)
        lock = FileLock(self.path + ".lock")
        started = time.monotonic()
        while True:
            try:
                lock.acquire(timeout=LOCK_WAIT_NOTICE_S)
                break
            except Timeout:
                waited = time.monotonic() - started
                sys.stderr.write(f"[trainer] waiting {waited:.0f} s for another process to finish tokenising "
                                 f"into {self.path} (lock {self.path}.lock)\n")
        try:
            found = self.load()  # another process built it while we waited
            if found is not None:
                return (*found, False)
            arrays, meta = build()
            self._write(arrays, meta)
        finally:
            lock.release()
        found = self.load()
        assert found is not None
        return (*found, True)

    def _write(self, arrays: dict, meta: dict) -> None:
        import numpy as np

        for leftover in os.listdir(self.root):  # a killed builder's temporary dirs (we hold the lock)
            if leftover.startswith(f"{self.key}.tmp-"):
                shutil.rmtree(os.path.join(self.root, leftover), ignore_errors=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        os.makedirs(tmp)
        try:
            for name, array in arrays.items():
                np.save(os.path.join(tmp, f"{name}.npy"), np.ascontiguousarray(array))
            with open(os.path.join(tmp, META_FILE), "w") as fh:
                json.dump({"arrays": sorted(arrays), "meta": meta}, fh)
            os.rename(tmp, self.path)  # atomic: the entry appears whole or not at all
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
