"""train.profile=N: a torch.profiler trace of N optimizer steps, written into the run folder as
<run>/profile/rank0.pt.trace.json: a Chrome trace that ui.perfetto.dev opens, and that TensorBoard's profiler plugin
(torch-tb-profiler: tensorboard --logdir <run>/profile) reads. The main process only (every rank does the same
work); the GPU's kernels too when there is one. The first step is a warm-up, not traced (lazy initialisation and
allocator growth would dominate it)."""
from __future__ import annotations

import os

import torch

from .run_folder import PROFILE

TRACE = "rank{rank}.pt.trace.json"      # the process's index: only 0 profiles


class StepProfiler:
    """Traces the optimizer steps after the first, `steps` of them, then writes the trace and stops profiling; a run
    that ends first writes what was traced (nothing when it ends after the warm-up step)."""

    def __init__(self, steps: int, run_dir: str, cuda: bool, rank: int = 0):
        self.path = os.path.join(run_dir, PROFILE, TRACE.format(rank=rank))
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        self.left = steps + 1
        self.profiler = torch.profiler.profile(
            activities=activities, schedule=torch.profiler.schedule(wait=0, warmup=1, active=steps, repeat=1),
            on_trace_ready=self._write)
        self.profiler.start()

    def step(self, last: bool = False) -> None:
        """After each optimizer step; last: training's last one."""
        if self.profiler is None:
            return
        self.left -= 1
        if self.left == 0 or last:
            self.close()          # stopping inside the traced steps writes them (the epoch's evaluation is not)
        else:
            self.profiler.step()

    def close(self) -> None:
        if self.profiler is not None:
            profiler, self.profiler = self.profiler, None
            profiler.stop()

    def _write(self, profiler) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        tmp = f"{self.path}.tmp-{os.getpid()}"
        profiler.export_chrome_trace(tmp)
        os.replace(tmp, self.path)      # a trace is either whole or absent


def step_profiler(steps: int | None, run_dir: str, accelerator) -> StepProfiler | None:
    """train.profile's profiler on the main process, None elsewhere or when it is off."""
    if not steps or not accelerator.is_main_process:
        return None
    return StepProfiler(steps, run_dir, accelerator.device.type == "cuda", accelerator.process_index)
