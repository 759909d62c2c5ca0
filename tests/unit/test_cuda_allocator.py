"""The worker starts PyTorch's CUDA allocator with expandable segments (trainer/cuda_allocator.py), which the
planner's margin assumes, unless the user configured the allocator under either of its variable names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from trainer.cuda_allocator import use_expandable_segments


def test_expandable_segments_are_set_when_the_allocator_is_not_configured():
    environ = {"PATH": "/usr/bin"}
    assert use_expandable_segments(environ)
    assert environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


@pytest.mark.parametrize("name", ["PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF"])
def test_a_users_allocator_setting_is_left_alone(name):
    environ = {name: "max_split_size_mb:512"}
    assert not use_expandable_segments(environ)
    assert environ == {name: "max_split_size_mb:512"}


def test_trainer_train_configures_the_allocator_in_its_own_process():
    """`single` on one process trains inside the `trainer train` process (launch/local.py), so the launcher itself
    sets it, before the config is even read."""
    code = ("import os\nfrom trainer.cli import main\ntry:\n    main(['train', 'train.max_steps=-1'])\nfinally:\n"
            "    print('CONF', os.environ.get('PYTORCH_CUDA_ALLOC_CONF'))")
    environ = {k: v for k, v in os.environ.items() if k not in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO,
                         env=environ)
    assert "train.max_steps" in out.stderr  # refused as a config error, after the allocator was set
    assert "CONF expandable_segments:True" in out.stdout, out.stdout + out.stderr
