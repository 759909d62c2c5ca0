"""A torchrun worker for test_restart_store.py: joins the process group the way trainer workers do.

Attempt 0: rank 0 dies after the group formed (its gloo address stays in torchrun's store).
Attempt 1: rank 0 is slow to start, so rank 1 reaches the store first, where the dead rank 0's address waits.
"""

import os
import sys
import time

from trainer.strategy.env import init_process_group, read_dist_env

attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
dist_env = read_dist_env()
if attempt == 1 and dist_env.rank == 0:
    time.sleep(3)
init_process_group(dist_env, timeout_s=20)

import torch.distributed as dist  # noqa: E402  (after the group exists, as in trainer.worker)

dist.barrier()
if attempt == 0 and dist_env.rank == 0:
    os._exit(1)
if attempt == 0:
    time.sleep(30)  # torchrun stops this rank when it sees rank 0 fail
dist.barrier()
print(f"attempt {attempt} rank {dist_env.rank} met its peers", flush=True)
sys.exit(0)
