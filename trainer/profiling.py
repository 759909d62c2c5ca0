"""`logger.profile_steps=N`: torch.profiler over N optimizer steps, from step 2 (step 1 is its warm-up), on every
rank. Written under <run_dir>/profile/: rank<R>.trace.json (open in https://ui.perfetto.dev or chrome://tracing)
and rank<R>-top-ops.txt (the operators that took the most time, with their memory)."""

from __future__ import annotations

import os


class StepProfiler:
    def __init__(self, steps: int, run_dir: str, rank: int, device, log=None):
        self.profiler = None
        if not steps:
            return
        from torch.profiler import ProfilerActivity, profile, schedule

        self.out_dir, self.rank, self.log = os.path.join(run_dir, "profile"), rank, log
        self.on_cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.on_cuda else [])
        self.profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                                on_trace_ready=self._write, profile_memory=True, with_stack=False)
        self.profiler.start()

    def step(self) -> None:
        """After each optimizer step."""
        if self.profiler is not None:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None

    def _write(self, profiler) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        trace = os.path.join(self.out_dir, f"rank{self.rank}.trace.json")
        profiler.export_chrome_trace(trace)
        sort = "self_cuda_time_total" if self.on_cuda else "self_cpu_time_total"
        with open(os.path.join(self.out_dir, f"rank{self.rank}-top-ops.txt"), "w") as fh:
            fh.write(profiler.key_averages().table(sort_by=sort, row_limit=30) + "\n")
        if self.log is not None and self.rank == 0:
            self.log(f"profile written: {trace} and rank0-top-ops.txt beside it")
