"""PyTorch's CUDA allocator with expandable segments unless the user configured it.

Packed batches change shape every step, which in the default allocator leaves freed blocks too small for the next
step's tensors: memory reserved but unusable (fragmentation). Expandable segments grow one mapping per stream
instead, so freed memory is reused whatever the next size is; the planner's margin (trainer/plan/memory.py) assumes
it. The setting is read when CUDA is first used, so it is made before the model is built; on a machine without CUDA
it changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

ALLOCATOR_VARIABLES = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")  # the new name and the one torch still reads
EXPANDABLE_SEGMENTS = "expandable_segments:True"


def use_expandable_segments(environ: MutableMapping[str, str] = os.environ) -> bool:
    """Set expandable segments where no allocator setting is given; True if it set them."""
    if any(environ.get(name) for name in ALLOCATOR_VARIABLES):
        return False
    environ["PYTORCH_CUDA_ALLOC_CONF"] = EXPANDABLE_SEGMENTS
    return True
