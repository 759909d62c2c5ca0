"""Measure one real training step's peak memory on CPU, per rank, by tracking allocations.

    python -m tests.integration.plan_probe RUN_DIR          (one rank)
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m tests.integration.plan_probe RUN_DIR

RUN_DIR holds a frozen config (written by `trainer train`'s own compose -> validate -> freeze path). The probe builds
the real `Recipe` from it (data, model, PEFT, strategy, optimizer), runs one step so that every persistent buffer
exists (optimizer state, DeepSpeed partitions), then measures the second step:

* ``live_before``: bytes of every tensor storage alive in the process before the step (each storage counted once,
  meta tensors excluded), found through the garbage collector: parameters and their shards, optimizer state, fp32
  master partitions, buffers. This is what a GPU's allocator would already hold when the step starts.
* ``peak_delta``: the highest running total of allocations minus frees made during the step, from torch.profiler's
  allocation events (``profile_memory=True``): gradients, activations, logits, autocast copies, gathered FSDP/ZeRO-3
  units, communication buffers that torch allocates. On GPU this would be ``max_memory_allocated`` minus what was
  allocated before the step.

``peak = live_before + peak_delta`` is the CPU analogue of ``torch.cuda.max_memory_allocated``: tensors the
allocator hands out, without the Python/torch runtime that dominates a CPU process's resident set. Each rank writes
RUN_DIR/probe-rank<N>.json. Not a test module itself: tests/integration/test_plan_vs_measured.py runs it.
"""

from __future__ import annotations

import gc
import json
import os
import sys


def live_tensor_bytes() -> int:
    """Bytes of all distinct tensor storages reachable by the garbage collector (CPU and CUDA; meta excluded)."""
    import torch

    gc.collect()
    seen: dict[int, int] = {}
    for obj in gc.get_objects():
        try:
            is_tensor = isinstance(obj, torch.Tensor)
        except Exception:  # some objects raise on isinstance (lazy proxies): not tensors
            continue
        if not is_tensor or obj.device.type == "meta":
            continue
        try:
            storage = obj.untyped_storage()
            pointer, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # wrappers without storage (DTensor), storages freed by FSDP
            continue
        if pointer:
            seen[pointer] = max(seen.get(pointer, 0), size)
    return sum(seen.values())


def allocation_peak(prof) -> tuple[int, int]:
    """(highest running total, final total) of the allocations the profiler saw, relative to its start."""
    from torch._C._profiler import _EventType

    def walk(events):
        for event in events:
            yield event
            yield from walk(event.children)

    allocations = [e for e in walk(prof.profiler.kineto_results.experimental_event_tree())
                   if e.typed[0] == _EventType.Allocation]
    allocations.sort(key=lambda e: e.start_time_ns)
    running = peak = 0
    for event in allocations:
        running += event.typed[1].alloc_size
        peak = max(peak, running)
    return peak, running


def measure_step(step) -> dict:
    """Run ``step()`` once to warm up, then measure a second call: live bytes before it and its allocation peak."""
    from torch.profiler import ProfilerActivity, profile

    step()  # creates optimizer state and every persistent buffer
    live_before = live_tensor_bytes()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    peak_delta, net_delta = allocation_peak(prof)
    # live_after - live_before differs from net_delta when memory allocated before the profiler started is freed
    # (or re-allocated) during the step: the profiler cannot see such frees, so peak_delta is then an upper bound.
    return {"live_before": live_before, "peak_delta": peak_delta, "net_delta": net_delta,
            "live_after": live_tensor_bytes(), "peak": live_before + peak_delta}


def measure_recipe(run_dir: str) -> dict:
    """The real Recipe of a frozen config: the second optimizer step, with the batch shapes it trained on."""
    import torch

    import trainer.data.loader as loader
    from trainer.config.frozen import load_frozen
    from trainer.recipe import Recipe

    shapes: list[list[int]] = []
    collate = loader.collate

    def recording_collate(*args, **kwargs):
        batch = collate(*args, **kwargs)
        shapes.append(list(batch.inputs["input_ids"].shape))
        return batch

    loader.collate = recording_collate  # train_step imports collate from the module when it runs
    recipe = Recipe(load_frozen(run_dir))
    try:
        result = measure_step(lambda: (shapes.clear(), recipe.train_step()))
        strategy = recipe.strategy
        engine = getattr(strategy, "engine", None)
        result.update(rank=strategy.rank, world_size=strategy.world_size, batch_shapes=shapes,
                      state_bytes=strategy.local_state_bytes(recipe.model, recipe.optimizer),
                      # DeepSpeed allocates its gradient reduce bucket at a size set by its config, not the model's
                      deepspeed_reduce_bucket_elements=engine.zero_reduce_bucket_size() if engine else 0,
                      torch=torch.__version__)
    finally:
        recipe.close()
    return result


def main(argv: list[str]) -> int:
    run_dir = argv[0]
    result = measure_recipe(run_dir)
    with open(os.path.join(run_dir, f"probe-rank{result['rank']}.json"), "w") as handle:
        json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
