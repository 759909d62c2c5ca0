"""Crash-safe checkpoints: step folders, a commit marker written last, keep-last-k, discovery for resume.

A checkpoint is `checkpoints/step-NNNNNN/` holding the model (trainable weights only under PEFT) and optimizer
(`state/`: torch.distributed.checkpoint shards, or DeepSpeed's own files for ZeRO), `trainer_state.json` (step,
tokens, sampler position, LR scheduler, fp16 loss scaler, W&B run id, world size) and every rank's RNG state as
JSON. It counts only once `COMMITTED` exists: written last, atomically (write, fsync, rename, fsync the dir), by
rank 0 after every rank has finished writing (and, with `async_save`, after every rank's background write has
finished). `COMMITTED` lists each file's size and crc32, so a truncated, missing or corrupted file is detected
at resume, which then falls back to the previous committed checkpoint with a warning. Old checkpoints are
deleted only after a new one is committed, marker first, so a half-deleted one never looks whole.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import time
import zlib
from dataclasses import asdict

from trainer.errors import UserError

MARKER = "COMMITTED"
STATE_FILE = "trainer_state.json"
MANIFEST_PREFIX = "manifest-rank"  # each rank's share of sizes and checksums, merged into COMMITTED
RESHARD_DIR = "resharded"  # in the run dir: a checkpoint converted for another world size while it is loaded
RUN_CONFIG = "run_config.yaml"  # in each checkpoint: the run's config.yaml as it was when the checkpoint was written
SET_ASIDE_DIR = "checkpoints-set-aside"  # in the run dir: committed checkpoints of an abandoned timeline, kept
_CHUNK = 8 * 1024 * 1024


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


def remove_stale_temporaries(run_dir: str) -> list[str]:
    """Delete the half-written files (NAME.tmp.PID: every atomic write here writes one, then renames it into place)
    that a process killed mid-write left at the top of RUN_DIR; returns their names. Called by rank 0 as a run
    starts: the run lock keeps every other job out and this run has written nothing yet, so each one is a leftover,
    never a write in progress. (Checkpoint dirs clean up their own: see save.)"""
    import re

    stale = re.compile(r"\.tmp\.\d+$")
    removed = []
    for name in sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []:
        path = os.path.join(run_dir, name)
        if stale.search(name) and os.path.isfile(path):
            os.remove(path)
            removed.append(name)
    return removed


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def file_crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def checkpoint_files(directory: str) -> list[str]:
    """The files that make up a checkpoint, relative and sorted (the marker and per-rank manifests excluded)."""
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel != MARKER and not name.startswith(MANIFEST_PREFIX) and ".tmp." not in name:
                files.append(rel)
    return sorted(files)


def _my_share(files: list[str], rank: int, world_size: int) -> list[str]:
    """Files are checksummed in parallel: rank r takes every world_size-th one."""
    return [rel for i, rel in enumerate(files) if i % world_size == rank]


def verify_checkpoint(directory: str, checksums: bool = True, rank: int = 0, world_size: int = 1) -> str | None:
    """None if the checkpoint is committed and whole; else why it cannot be used. Sizes are checked for every
    file; checksums (when recorded and asked for) only for this rank's share of the files."""
    marker = os.path.join(directory, MARKER)
    if not os.path.isfile(marker):
        return "not committed (no COMMITTED marker: the save did not finish)"
    try:
        with open(marker) as fh:
            committed = json.load(fh)
        expected, crcs = committed["files"], committed.get("crc32", {})
    except (OSError, ValueError, KeyError):
        return "its COMMITTED marker is unreadable"
    for rel, size in expected.items():
        path = os.path.join(directory, rel)
        if not os.path.isfile(path):
            return f"missing file {rel}"
        if os.path.getsize(path) != size:
            return f"{rel} has {os.path.getsize(path)} bytes, expected {size} (truncated or damaged)"
    if checksums:
        for rel in _my_share(sorted(crcs), rank, world_size):
            if file_crc32(os.path.join(directory, rel)) != crcs[rel]:
                return f"{rel} fails its crc32 check (its content changed after the commit)"
    return None


def list_checkpoints(run_dir: str) -> list[str]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if n.startswith("step-") and n[5:].isdigit())
    return [os.path.join(root, n) for n in names]


def is_committed(directory: str) -> bool:
    return os.path.isfile(os.path.join(directory, MARKER))


def find_resumable(run_dir: str, warn=print, rank: int = 0, world_size: int = 1, agree=None,
                   problems: dict | None = None) -> str | None:
    """The newest committed, intact checkpoint; damaged or uncommitted ones are skipped with a warning (and their
    problem recorded in `problems`, by dir name, when given).

    With several ranks each checks its share of the checksums and `agree` (an all-reduce max) makes every rank
    reject a checkpoint that any rank found damaged, so all ranks pick the same one."""
    for directory in reversed(list_checkpoints(run_dir)):
        problem = verify_checkpoint(directory, rank=rank, world_size=world_size)
        if agree is not None and agree(1.0 if problem else 0.0) > 0 and problem is None:
            problem = "a file failed its checksum on another rank"
        if problem is None:
            return directory
        warn(f"skipping checkpoint {directory}: {problem}")
        if problems is not None:
            problems[os.path.basename(directory)] = problem
    return None


def set_aside(run_dir: str, directory: str, log=print) -> str:
    """Move a committed checkpoint that is not superseded (a newer step of an abandoned timeline, or damaged) out
    of checkpoints/, where resume=auto would find it, into RUN/checkpoints-set-aside/: never deleted by us."""
    root = os.path.join(run_dir, SET_ASIDE_DIR)
    os.makedirs(root, exist_ok=True)
    target, n = os.path.join(root, os.path.basename(directory)), 1
    while os.path.exists(target):
        n += 1
        target = os.path.join(root, f"{os.path.basename(directory)}.{n}")
    os.replace(directory, target)
    log(f"set {directory} aside as {target}: it is not older than the checkpoint this run continues from (another "
        "timeline, or damaged); delete it when you no longer need it")
    return target


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


def _wandb_run_id(run_dir: str) -> str | None:
    from trainer.log import WANDB_ID_FILE

    path = os.path.join(run_dir, WANDB_ID_FILE)
    return open(path).read().strip() if os.path.exists(path) else None


class CheckpointManager:
    """Saves, commits, prunes and restores checkpoints. Every public method is collective: call it on all ranks."""

    def __init__(self, run_dir: str, cfg, strategy, log=print):
        self.run_dir = run_dir
        self.cfg = cfg
        self.strategy = strategy
        self.log = log
        self.async_save = bool(getattr(cfg, "async_save", False)) and getattr(strategy, "supports_async_save", True)
        if getattr(cfg, "async_save", False) and not self.async_save:
            log(f"checkpoint.async_save is ignored: {type(strategy).__name__} writes its checkpoints synchronously")
        self._pending: tuple[str, int, object] | None = None  # (directory, step, future) of a background write
        self._last_save = time.monotonic()
        self._timing = (0.0, 0.0)  # (start, seconds training waited) of the save being committed

    # ------------------------------------------------------------------------------------------ saving
    def due(self, step: int, epoch_ended: bool = False) -> bool:
        """Whether to save after `step`: every_n_steps, at an epoch's end (every_epoch), or every_n_minutes by rank
        0's clock (broadcast, so all ranks agree even when their clocks or step times differ)."""
        by_steps = self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0
        by_steps = by_steps or (epoch_ended and getattr(self.cfg, "every_epoch", False))
        minutes = getattr(self.cfg, "every_n_minutes", 0)
        if minutes <= 0:
            return by_steps
        late = self.strategy.is_main and time.monotonic() - self._last_save >= minutes * 60
        return self.strategy.all_reduce_max(1.0 if late else 0.0) > 0 or by_steps

    def save(self, recipe) -> str:
        """Every rank writes its shards; the commit follows once every rank is done (now, or for an async save
        at a later step boundary: `poll`/`finish`)."""
        self.finish()  # one save in flight at most, committed in step order
        started = time.perf_counter()
        step = recipe.state.step
        directory = os.path.join(self.run_dir, "checkpoints", step_dir_name(step))
        if self.strategy.is_main and os.path.exists(directory):
            if is_committed(directory):  # another timeline's (resume went back) or a damaged one: kept aside
                set_aside(self.run_dir, directory, self.log)
            else:
                shutil.rmtree(directory)  # a leftover of a save that crashed at this step
        self.strategy.barrier()
        needed = self._check_space(recipe)
        try:
            os.makedirs(directory, exist_ok=True)
            future = self.strategy.save_state(recipe.model, recipe.optimizer, os.path.join(directory, "state"),
                                              async_save=self.async_save)
            with open(os.path.join(directory, f"rng-rank{self.strategy.rank:05d}.json"), "w") as fh:
                json.dump(_rng_state(), fh)
            if self.strategy.is_main:
                write_json_atomically(os.path.join(directory, STATE_FILE), self._trainer_state(recipe))
                self._write_run_config(directory)
        except BaseException as err:  # DCP's CheckpointException derives from BaseException
            from trainer.disk_space import DiskFull, free_bytes, is_out_of_space

            if isinstance(err, (KeyboardInterrupt, SystemExit)):
                raise

            # torch's zip writer reports a full disk as "unexpected pos", so a failed save with the disk now
            # (partial files included) too full for it counts as one too.
            free = free_bytes(os.path.dirname(directory), real=True)
            if not (is_out_of_space(err) or free < needed):
                raise
            shutil.rmtree(directory, ignore_errors=True)  # never committed: nothing of it could ever load
            raise DiskFull(os.path.dirname(directory), free, needed, during=True) from None
        self._last_save = time.monotonic()
        self._timing = (started, time.perf_counter() - started)
        if future is None:
            self._commit(directory, step)
        else:
            self._pending = (directory, step, future)
        return directory

    def _check_space(self, recipe) -> int:
        """Refuse a save that cannot fit, on every rank alike, before any of it is written (trainer/disk_space.py);
        returns the bytes it needs."""
        from trainer.disk_space import DiskFull, committed_bytes, free_bytes, needed_bytes

        parent = os.path.join(self.run_dir, "checkpoints")
        os.makedirs(parent, exist_ok=True)
        newest = max((os.path.join(parent, d) for d in os.listdir(parent) if is_committed(os.path.join(parent, d))),
                     default=None)
        previous = committed_bytes(newest, MARKER) // self.strategy.world_size if newest else 0
        needed = needed_bytes(previous, recipe.model, recipe.optimizer)
        free = free_bytes(parent)
        if self.strategy.all_reduce_max(1.0 if free < needed else 0.0) > 0:
            raise DiskFull(parent, free, needed, during=False)
        return needed

    def _write_run_config(self, directory: str) -> None:
        """The config this checkpoint was trained with travels inside it (and is covered by COMMITTED), so export,
        generate and resume=PATH read the model and PEFT shape its tensors have, wherever it is copied."""
        source = os.path.join(self.run_dir, "config.yaml")
        if os.path.isfile(source):
            target = os.path.join(directory, RUN_CONFIG)
            shutil.copyfile(source, f"{target}.tmp.{os.getpid()}")
            os.replace(f"{target}.tmp.{os.getpid()}", target)

    def _trainer_state(self, recipe) -> dict:
        return {
            "trainer": asdict(recipe.state),
            "sampler": recipe.sampler.state_dict(),
            "scheduler": recipe.scheduler.state_dict(),
            "grad_scaler": self.strategy.scaler_state_dict(),
            "wandb_run_id": _wandb_run_id(self.run_dir),
            "world_size": self.strategy.world_size,
            "format": self.strategy.checkpoint_format,
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def poll(self) -> None:
        """At a step boundary: commit a background save once every rank's write has finished (never blocks)."""
        if self._pending is None:
            return
        still_writing = not self._pending[2].done()
        if self.strategy.all_reduce_max(1.0 if still_writing else 0.0) == 0:
            self.finish()

    def finish(self) -> None:
        """Wait for a background save (if any) and commit it: before the next save, at the end, before exiting."""
        if self._pending is None:
            return
        directory, step, future = self._pending
        self._pending = None
        future.result()  # re-raises a failed background write: the checkpoint then stays uncommitted
        self._commit(directory, step)

    def _commit(self, directory: str, step: int) -> None:
        """Each rank records sizes (and crc32s) of its share of the files; rank 0 merges them into COMMITTED."""
        self.strategy.barrier()  # every rank's files are complete
        files = checkpoint_files(directory)
        share = {}
        for rel in _my_share(files, self.strategy.rank, self.strategy.world_size):
            path = os.path.join(directory, rel)
            share[rel] = [os.path.getsize(path), file_crc32(path) if self.cfg.checksum else None]
        write_json_atomically(os.path.join(directory, f"{MANIFEST_PREFIX}{self.strategy.rank:05d}.json"), share)
        self.strategy.barrier()
        if self.strategy.is_main:
            merged = {}
            for rank in range(self.strategy.world_size):
                path = os.path.join(directory, f"{MANIFEST_PREFIX}{rank:05d}.json")
                with open(path) as fh:
                    merged.update(json.load(fh))
                os.remove(path)
            marker = {"step": step, "files": {rel: merged[rel][0] for rel in files}}
            if self.cfg.checksum:
                marker["crc32"] = {rel: merged[rel][1] for rel in files}
            write_json_atomically(os.path.join(directory, MARKER), marker)
            self._prune(step)
            started, blocked = self._timing
            total = time.perf_counter() - started
            waited = f"; training paused {blocked:.2f} s of it (async)" if self.async_save else ""
            self.log(f"checkpoint {os.path.basename(directory)} committed: {sum(marker['files'].values()) / 2**20:.1f} "
                     f"MiB in {total:.2f} s{waited}")
        self.strategy.barrier()

    def _prune(self, newest: int) -> None:
        """After committing step `newest`: keep the newest `keep_last` committed checkpoints up to it; remove
        uncommitted debris (a crashed save is never completed once a later one committed). Committed checkpoints
        newer than it (damaged, or another timeline's after `resume=PATH` or `resume=never` went back:
        `resume=auto` must not jump to them later) are not superseded, so they are set aside, never deleted."""
        def step_of(directory: str) -> int:
            return int(os.path.basename(directory)[5:])

        checkpoints = list_checkpoints(self.run_dir)
        committed = [d for d in checkpoints if os.path.isfile(os.path.join(d, MARKER)) and step_of(d) <= newest]
        doomed = committed[:-self.cfg.keep_last] if self.cfg.keep_last else []
        doomed += [d for d in checkpoints if d not in committed and step_of(d) != newest]
        for directory in doomed:
            if step_of(directory) > newest and is_committed(directory):
                set_aside(self.run_dir, directory, self.log)
                continue
            marker = os.path.join(directory, MARKER)
            if os.path.exists(marker):
                os.remove(marker)  # first: a crash mid-delete leaves an uncommitted dir, never a "whole" broken one
                _fsync_dir(directory)
            shutil.rmtree(directory, ignore_errors=True)

    # ---------------------------------------------------------------------------------------- resuming
    def resume(self, resume: str, recipe) -> str | None:
        """Restore from `resume` (auto/never/path); returns the checkpoint used, or None for a fresh start."""
        if resume == "never":
            return None
        rank, world = self.strategy.rank, self.strategy.world_size
        if resume == "auto":
            problems: dict[str, str] = {}
            directory = find_resumable(self.run_dir, warn=self._warn, rank=rank, world_size=world,
                                       agree=self.strategy.all_reduce_max, problems=problems)
            if directory is None:
                self._refuse_damaged_history(problems)
                return None
        else:
            directory = resume
            problem = verify_checkpoint(directory, rank=rank, world_size=world)
            if self.strategy.all_reduce_max(1.0 if problem else 0.0) > 0:
                raise UserError(f"resume={directory}: cannot resume from it: "
                                f"{problem or 'a file failed its checksum on another rank'}")
        self.load(directory, recipe)
        recipe.logger.info(f"resumed from {directory} at step {recipe.state.step}")
        return directory

    def _refuse_damaged_history(self, problems: dict[str, str]) -> None:
        """Checkpoints were committed and none loads: starting from step 0 would train over (and prune away) the
        run's history. Uncommitted ones alone never counted (a crash during the first save): those start afresh."""
        committed = [os.path.basename(d) for d in list_checkpoints(self.run_dir) if is_committed(d)]
        if committed:
            listing = "; ".join(f"{name}: {problems.get(name, 'unusable')}" for name in reversed(committed))
            raise UserError(f"cannot resume {self.run_dir}: no committed checkpoint can be loaded ({listing}); "
                            "restore one, resume from a checkpoint by path (resume=PATH), or start again from step 0 "
                            "with resume=never (the damaged ones are then set aside, not deleted)")

    def _warn(self, message: str) -> None:
        if self.strategy.is_main:
            self.log(message)
        elif "another rank" not in message:
            sys.stderr.write(f"[trainer rank {self.strategy.rank}] {message}\n")

    def load(self, directory: str, recipe) -> None:
        from trainer.recipe import TrainState

        with open(os.path.join(directory, STATE_FILE)) as fh:
            saved = json.load(fh)
        self._check_compatible(directory, saved)
        scratch = os.path.join(self.run_dir, RESHARD_DIR, os.path.basename(os.path.normpath(directory)))
        self.strategy.load_state(recipe.model, recipe.optimizer, os.path.join(directory, "state"),
                                 saved_world_size=saved.get("world_size"), scratch_dir=scratch)
        self.strategy.barrier()  # every rank has read the converted files (if any) before they go
        if self.strategy.is_main and os.path.isdir(scratch):
            shutil.rmtree(scratch, ignore_errors=True)
            with contextlib.suppress(OSError):
                os.rmdir(os.path.dirname(scratch))  # only when no other conversion is in there
        recipe.state = TrainState(**saved["trainer"])
        try:
            recipe.sampler.load_state_dict(saved["sampler"])
        except ValueError as err:
            raise UserError(f"cannot resume from {directory}: {err}") from None
        recipe.scheduler.load_state_dict(saved["scheduler"])
        self.strategy.load_scaler_state_dict(saved.get("grad_scaler"))
        saved_id, current_id = saved.get("wandb_run_id"), _wandb_run_id(self.run_dir)
        if saved_id and current_id and saved_id != current_id:
            recipe.logger.info(f"the checkpoint was logged to W&B run {saved_id}; this run dir logs to {current_id}")
        rng_path = os.path.join(directory, f"rng-rank{self.strategy.rank:05d}.json")
        if os.path.exists(rng_path):  # absent for ranks beyond the saving world size: they keep their seeded streams
            with open(rng_path) as fh:
                _set_rng_state(json.load(fh))

    def _check_compatible(self, directory: str, saved: dict) -> None:
        """Refuse, in one line, what cannot load: another checkpoint format, or ZeRO on another world size."""
        fmt, here = saved.get("format", "dcp"), self.strategy.checkpoint_format
        if fmt != here:
            raise UserError(f"cannot resume from {directory}: it was written by a {fmt} strategy and this run uses a "
                            f"{here} one; resume with the strategy that wrote it, or export it (`trainer export "
                            f"{directory} --to hf --out DIR`) and start a new run from that model")
        saved_world = saved.get("world_size", self.strategy.world_size)
        if saved_world != self.strategy.world_size and not self.strategy.reshards_checkpoints:
            raise UserError(f"cannot resume from {directory} on {self.strategy.world_size} ranks: this DeepSpeed "
                            f"checkpoint was saved on {saved_world} and ZeRO state offloaded to NVMe does not "
                            f"reshard; resume with "
                            f"launcher.nproc_per_node x nnodes = {saved_world}, or export it (`trainer export "
                            f"{directory} --to hf --out DIR`) and start a new run from that model")


def save_final_model(strategy, model, tokenizer, final_dir: str) -> None:
    """Write final/ through a temp dir swapped in at the end: a crash leaves the old final/ or the new one.

    Full fine-tuning streams the weights tensor by tensor into safetensors shards (no rank ever holds the
    whole model); PEFT runs save only the adapter, in PEFT's own format, loadable on the base model.
    """
    from trainer.adapters import is_peft_model
    from trainer.weights import ShardedSafetensorsWriter, apply_umask

    inner = strategy.unwrap(model)
    tmp = f"{final_dir}.tmp"
    if strategy.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    if is_peft_model(inner):
        adapter_state = {name: tensor for name, tensor in strategy.iter_full_state(model, trainable_only=True)}
        if strategy.is_main:
            inner.save_pretrained(tmp, state_dict=adapter_state)
    else:
        writer = ShardedSafetensorsWriter(tmp) if strategy.is_main else None
        tied = bool(getattr(inner.config, "tie_word_embeddings", False))
        for name, tensor in strategy.iter_full_state(model, trainable_only=False):
            if writer is not None and not (tied and name == "lm_head.weight"):
                writer.add(name, tensor)
        if writer is not None:
            writer.close()
            inner.config.save_pretrained(tmp)
            if getattr(inner, "generation_config", None) is not None:
                inner.generation_config.save_pretrained(tmp)
    if strategy.is_main:
        tokenizer.save_pretrained(tmp)
        apply_umask(tmp)
        old = f"{final_dir}.old"
        if os.path.exists(final_dir):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final_dir, old)
        os.replace(tmp, final_dir)
        shutil.rmtree(old, ignore_errors=True)
    strategy.barrier()
