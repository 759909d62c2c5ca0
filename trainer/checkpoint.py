"""Crash-safe checkpoints: step folders, a commit marker written last, keep-last-k, discovery for resume.

A checkpoint is `checkpoints/step-NNNNNN/` holding the model (trainable weights only under PEFT) and
optimizer through torch.distributed.checkpoint (DCP: sharded, resharding-capable, no pickles), the
trainer state as JSON, every rank's RNG state as JSON, and `COMMITTED`, written last, atomically, by
rank 0 after every rank has finished. `COMMITTED` lists each file's size, so a truncated or missing
shard is detected at resume. Old checkpoints are deleted only after a new one is committed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from dataclasses import asdict

from trainer.errors import UserError

MARKER = "COMMITTED"
STATE_FILE = "trainer_state.json"


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomically(path: str, payload: dict) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def _files_with_sizes(directory: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            full = os.path.join(root, name)
            rel = os.path.relpath(full, directory)
            if rel != MARKER:
                sizes[rel] = os.path.getsize(full)
    return sizes


def verify_checkpoint(directory: str) -> str | None:
    """None if the checkpoint is committed and whole; else why it cannot be used."""
    marker = os.path.join(directory, MARKER)
    if not os.path.isfile(marker):
        return "not committed (no COMMITTED marker: the save did not finish)"
    try:
        with open(marker) as fh:
            expected = json.load(fh)["files"]
    except (OSError, ValueError, KeyError):
        return "its COMMITTED marker is unreadable"
    for rel, size in expected.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"missing file {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, expected {size} (truncated or damaged)"
    return None


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and n[5:].isdigit())
    return [os.path.join(root, n) for n in names]


def find_resumable(run_dir: str, warn=print) -> str | None:
    """The newest committed, intact checkpoint; damaged or uncommitted ones are skipped with a warning."""
    for directory in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(directory)
        if problem is None:
            return directory
        warn(f"skipping checkpoint {directory}: {problem}")
    return None


def _rng_state() -> dict:
    import numpy as np
    import torch

    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class CheckpointManager:
    def __init__(self, run_dir: str, cfg, strategy):
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy

    def save(self, recipe) -> str:
        """Every rank writes its shards; rank 0 commits after a barrier, then prunes old checkpoints."""
        import torch.distributed.checkpoint as dcp

        directory = os.path.join(self.run_dir, "checkpoints", step_dir_name(recipe.state.step))
        if self.strategy.is_main and os.path.exists(directory):
            shutil.rmtree(directory)  # an uncommitted leftover of a crashed save at this step
        self.strategy.barrier()
        os.makedirs(directory, exist_ok=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DCP warns that it runs without a process group on one rank
            dcp.save(self._model_and_optimizer_state(recipe), checkpoint_id=os.path.join(directory, "state"))
        with open(os.path.join(directory, f"rng-rank{self.strategy.rank:05d}.json"), "w") as fh:
            json.dump(_rng_state(), fh)
        if self.strategy.is_main:
            write_json_atomically(os.path.join(directory, STATE_FILE), {
                "trainer": asdict(recipe.state),
                "sampler": recipe.sampler.state_dict(),
                "scheduler": recipe.scheduler.state_dict(),
                "world_size": self.strategy.world_size,
            })
        self.strategy.barrier()
        if self.strategy.is_main:
            write_json_atomically(os.path.join(directory, MARKER),
                                  {"step": recipe.state.step, "files": _files_with_sizes(directory)})
            self._prune()
        self.strategy.barrier()
        return directory

    def _model_and_optimizer_state(self, recipe) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        options = StateDictOptions(ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(recipe.model, recipe.optimizer, options=options)
        return {"model": model_state, "optimizer": optim_state}

    def _prune(self) -> None:
        if not self.cfg.keep_last:
            return
        committed = [d for d in list_checkpoints(self.run_dir) if os.path.isfile(os.path.join(d, MARKER))]
        for directory in committed[:-self.cfg.keep_last]:
            shutil.rmtree(directory, ignore_errors=True)

    def resume(self, resume: str, recipe) -> str | None:
        """Restore from `resume` (auto/never/path); returns the checkpoint used, or None for a fresh start."""
        if resume == "never":
            return None
        if resume == "auto":
            directory = find_resumable(self.run_dir, warn=recipe.logger.info)
            if directory is None:
                return None
        else:
            directory = resume
            problem = verify_checkpoint(directory)
            if problem is not None:
                raise UserError(f"resume={directory}: cannot resume from it: {problem}")
        self.load(directory, recipe)
        recipe.logger.info(f"resumed from {directory} at step {recipe.state.step}")
        return directory

    def load(self, directory: str, recipe) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        from trainer.recipe import TrainState

        state = self._model_and_optimizer_state(recipe)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(state, checkpoint_id=os.path.join(directory, "state"))
        set_state_dict(recipe.model, recipe.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optimizer"], options=StateDictOptions(ignore_frozen_params=True))
        with open(os.path.join(directory, STATE_FILE)) as fh:
            saved = json.load(fh)
        recipe.state = TrainState(**saved["trainer"])
        recipe.sampler.load_state_dict(saved["sampler"])
        recipe.scheduler.load_state_dict(saved["scheduler"])
        rng_path = os.path.join(directory, f"rng-rank{self.strategy.rank:05d}.json")
        if os.path.exists(rng_path):
            with open(rng_path) as fh:
                _set_rng_state(json.load(fh))


def save_pretrained_atomically(model, tokenizer, final_dir: str) -> None:
    """Write into a temp dir, then swap it in: a crash leaves either the old final/ or the new one."""
    tmp = f"{final_dir}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    old = f"{final_dir}.old"
    if os.path.exists(final_dir):
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final_dir, old)
    os.replace(tmp, final_dir)
    shutil.rmtree(old, ignore_errors=True)
