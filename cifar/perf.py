"""Speed accounting: model FLOPs, device peak, MFU, compile warm-up kept out of the training time."""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense tensor-core peaks in FLOP/s by GPU name fragment (bf16/fp16; fp32 runs as TF32 at half that).
PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12, "V100": 125e12,
         "RTX 4090": 165e12, "RTX 3090": 71e12}


def flops_per_image(model: torch.nn.Module, images: torch.Tensor) -> float:
    """Forward + backward FLOPs of one training image, counted on a copy (BN statistics stay untouched)."""
    probe = copy.deepcopy(model).train()
    counter = FlopCounterMode(display=False)
    with counter:
        probe(images).float().sum().backward()
    return counter.get_total_flops() / len(images)


def device_peak(device: torch.device, precision: str) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    peak = next((v for k, v in PEAKS.items() if k in name), None)
    return None if peak is None else peak if precision in ("bf16", "fp16") else peak / 2


def mfu(flops: float, images: int, seconds: float, accelerator, precision: str) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None where the peak is unknown)."""
    peak = device_peak(accelerator.device, precision)
    if peak is None or seconds <= 0:
        return None
    return flops * images / seconds / (peak * accelerator.num_processes)


def keep_freed_memory() -> bool:
    """Let glibc's malloc serve large blocks from its heap and keep what is freed, instead of mapping each block
    fresh from the OS and unmapping it on free. A CPU training step at batch 2000 allocates about 6 GB of
    activations and gradients in blocks far above malloc's mmap threshold; every page of them was faulted in again
    each step (a quarter of the step's CPU time on 2 cores, bench/README.md). PyTorch's CPU tuning guide gets the
    same by preloading jemalloc or tcmalloc. Returns False where libc has no mallopt (not glibc)."""
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    m_trim_threshold, m_mmap_threshold = -1, -3                   # from glibc's malloc.h
    most = 2**31 - 1                                              # mallopt takes an int
    return bool(mallopt(m_mmap_threshold, most) and mallopt(m_trim_threshold, most))


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled so far in this process (dynamo's own count)."""
    from torch._dynamo.utils import counters
    return counters["stats"]["unique_graphs"]


def compile_warmup(model, optimizer, scaler, train_step, evaluate, phases=(lambda: None,)) -> float:
    """Run the compiled model's first training steps and evaluation on a throwaway copy of the training state, so
    the compilation time is measured apart and the real run starts from exactly the state it had. Each phase sets
    up one variant of the training graph (e.g. with a parameter frozen) that the run will meet."""
    start = time.perf_counter()
    saved = [copy.deepcopy(x.state_dict()) for x in (model, optimizer) + ((scaler,) if scaler else ())]
    for phase in phases:    # dynamo guards on requires_grad, even under no_grad: each phase compiles both
        phase()
        for _ in range(3):  # CUDA graphs (compile_mode=reduce-overhead) are warmed up and recorded over 2 calls
            train_step()
        evaluate()
    for x, state in zip((model, optimizer) + ((scaler,) if scaler else ()), saved):
        x.load_state_dict(state)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start
