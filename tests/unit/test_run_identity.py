"""What a resume may change (trainer/run_identity.py) and the run dir's lock (trainer/run_lock.py), in process.
The same rules through the real CLI: tests/integration/test_run_dir.py."""

from __future__ import annotations

import errno
import json
import os

import pytest

from trainer.errors import ConfigError, UserError
from trainer.run_identity import compare
from trainer.run_lock import LOCK_NAME, RunLock

RUN = {"seed": 1, "run": {"dir": "/r", "allow_changes": []}, "resume": "auto",
       "model": {"path": "/m", "attn_implementation": "auto"}, "peft": {"name": "lora", "r": 16},
       "data": {"path": "d.jsonl", "max_seq_len": 256, "packing": False, "cache": True},
       "optim": {"name": "adamw", "lr": 1e-3, "freeze": {"patterns": []}},
       "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2},
       "strategy": {"name": "single", "device": "auto"}, "checkpoint": {"every_n_steps": 5}}


def _with(**changes) -> dict:
    new = json.loads(json.dumps(RUN))
    for dotted, value in changes.items():
        node = new
        *parents, last = dotted.split("__")
        for key in parents:
            node = node[key]
        node[last] = value
    return new


@pytest.mark.parametrize("change,key", [
    ({"peft__r": 8}, "peft.r=8"), ({"peft__name": "none"}, "peft.name=none"), ({"seed": 2}, "seed=2"),
    ({"model__path": "/other"}, "model.path=/other"), ({"data__packing": True}, "data.packing=true"),
    ({"data__max_seq_len": 512}, "data.max_seq_len=512"), ({"train__global_batch_size": 16}, "global_batch_size"),
    ({"optim__freeze__patterns": ["embed"]}, "optim.freeze.patterns"),
    ({"strategy": {"name": "zero2", "stage": 2}}, "strategy=zero2")])
def test_identity_changes_are_refused(change, key):
    refused, _ = compare(RUN, _with(**change))
    assert len(refused) == 1 and key in refused[0], refused


def test_optimizer_settings_need_an_explicit_opt_in():
    refused, accepted = compare(RUN, _with(optim__lr=5e-3))
    assert "run.allow_changes=[optim.lr]" in refused[0] and not accepted
    refused, accepted = compare(RUN, _with(optim__lr=5e-3), ["optim.lr"])
    assert not refused and accepted == {"optim.lr": [1e-3, 5e-3]}


def test_safe_changes_are_accepted_and_directives_are_not_stated():
    new = _with(train__max_steps=20, checkpoint__every_n_steps=2, train__micro_batch_size=1, data__cache=False,
                resume="never", run__allow_changes=["optim.lr"], model__attn_implementation="eager")
    new["strategy"] = {"name": "fsdp", "timeout_s": 60}  # DCP strategies reshard each other's checkpoints
    refused, accepted = compare(RUN, new)
    assert not refused
    assert sorted(accepted) == ["checkpoint.every_n_steps", "data.cache", "model.attn_implementation",
                                "strategy.name", "train.max_steps", "train.micro_batch_size"]


def test_keys_unknown_to_one_side_are_not_changes():
    new = _with()
    new["data"]["a_new_option"] = 1
    assert compare(RUN, new) == ([], {})


def test_allow_changes_names_only_optimizer_settings(tmp_path):
    from tests.conftest import compose_config

    assert compose_config(f"run.dir={tmp_path}", "run.allow_changes=[optim.lr]").run.allow_changes == ["optim.lr"]
    with pytest.raises(ConfigError, match=r"run.allow_changes.0: 'peft.r' is not one of optim.lr"):
        compose_config(f"run.dir={tmp_path}", "run.allow_changes=[peft.r]")


# ------------------------------------------------------------------------------------------------ the lock
def test_a_held_run_dir_is_refused_naming_the_holder_and_free_again_after_release(tmp_path):
    first = RunLock(str(tmp_path))
    first.acquire()
    holder = json.loads((tmp_path / LOCK_NAME).read_text())
    assert holder["pid"] == os.getpid() and holder["host"]
    with pytest.raises(UserError, match=rf"is in use by pid {os.getpid()} on .*another run.dir"):
        RunLock(str(tmp_path)).acquire()
    first.release()
    with RunLock(str(tmp_path)):  # free again
        pass


def test_a_leftover_of_a_dead_holder_is_taken_over(tmp_path):
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": "gone", "started": "then"}))
    said = []
    with RunLock(str(tmp_path), log=said.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert "the previous holder (pid 999999999 on gone" in said[0]


def test_without_flock_the_file_content_decides(tmp_path, monkeypatch):
    import fcntl
    import socket

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    here = socket.gethostname()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 999999999, "host": here}))
    lock = RunLock(str(tmp_path), log=lambda message: None)
    lock.acquire()  # this host, pid gone: stale
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": here}))
    with pytest.raises(UserError, match="wait for it to end"):
        RunLock(str(tmp_path)).acquire()
    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": 1, "host": "elsewhere", "slurm_job_id": "5"}))
    with pytest.raises(UserError, match=f"remove {tmp_path / LOCK_NAME}"):
        RunLock(str(tmp_path)).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "5")  # the same job, requeued: its earlier run is over
    RunLock(str(tmp_path), log=lambda message: None).acquire()
