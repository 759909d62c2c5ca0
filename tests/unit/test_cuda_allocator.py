"""The worker starts PyTorch's CUDA allocator with expandable segments (trainer/cuda_allocator.py), which the
planner's margin assumes, unless the user configured the allocator under either of its variable names."""

from __future__ import annotations

import pytest

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
