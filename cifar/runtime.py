"""The process setup both entry points share: an Accelerator for the config, main-process-only work, and a clean
end of the process group."""
from __future__ import annotations

import os

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, TorchDynamoPlugin,
                               broadcast_object_list)

from .config import Config
from .errors import AlreadyFinished, UserError, leave_without_finalizing
from .perf import keep_freed_memory


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not cuda:
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
    deterministic(cfg.train.deterministic)
    if cuda:    # fixed shapes: let cuDNN time its conv algorithms once (not train.deterministic: timing may pick
        # another algorithm each run); fp32 matmuls may use TF32
        torch.backends.cudnn.benchmark = not cfg.train.deterministic
        torch.set_float32_matmul_precision("high")
    elif cfg.train.keep_freed_memory:
        keep_freed_memory()
    mode = compile_mode(cfg.train.compile_mode, int(os.environ.get("WORLD_SIZE", "1")))
    dynamo = TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no", mode=mode)
    # A parameter that stops training mid-run (model.whiten_bias_epochs) gets no gradient afterwards; DDP's reducer
    # then fails the next step unless it looks for unused parameters in every backward pass.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.whiten_bias_epochs is not None)
    # Gradient accumulation is done by the engine (see train_step), so Accelerate's own count stays at 1.
    accelerator = Accelerator(cpu=not cuda, mixed_precision=precision, dynamo_plugin=dynamo, kwargs_handlers=[ddp],
                              dataloader_config=DataLoaderConfiguration(non_blocking=cuda))  # with pinned batches
    if accelerator.num_processes > 1:
        leave_without_finalizing()
    return accelerator


def deterministic(on: bool) -> None:
    """train.deterministic: torch's deterministic algorithms on, or off (torch's default; set either way, so that a
    run in the same process as an earlier one gets what its config says). An op with no deterministic CUDA kernel
    warns, naming itself, and runs as it is (warn_only): the backward passes of adaptive pooling, which resnet18 and
    fastnet end with, have none, and an error there would leave the mode unusable for every recipe. cuBLAS needs a
    fixed workspace for deterministic matmuls (CUDA >= 10.2); one the user set is kept."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.deterministic = on


def compile_mode(mode: str, world: int) -> str:
    """torch.compile's mode for a run of `world` processes. CUDA graphs around DDP's bucketed all-reduce are
    untested here, so several processes compile the same way without them."""
    if world > 1:
        return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return mode


def on_main(accelerator: Accelerator, fn):
    """Run fn on the main process only and hand every rank its result, or the same UserError (or SaveFailed, or
    AlreadyFinished)."""
    box = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", fn())
        except (UserError, AlreadyFinished) as e:
            box[0] = ("error", e)
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise value
    return value


def shut_down(accelerator: Accelerator) -> None:
    """Ranks tear the process group down together: a rank that leaves while another still uses it can abort
    ("terminate called without an active exception") instead of exiting cleanly."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
