"""Learning-rate schedules counted in optimizer steps (never micro-batches), so that under gradient
accumulation the last optimizer step of the run lands exactly on the schedule's end value."""
from __future__ import annotations

import math

import torch

from .config import ScheduleConfig

END_FACTOR = {"constant": 1.0, "cosine": 0.0, "onecycle": 0.0, "linear": 0.0}


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly to 1 over `warmup_steps`; then constant stays at 1, cosine follows a half cosine to 0 and
    onecycle and linear fall linearly to 0, all three reaching 0 at step total_steps - 1. onecycle with no warmup
    given warms up over the first 25% of the steps; linear does not warm up unless told.
    """
    if name == "onecycle" and warmup_steps == 0:
        warmup_steps = max(1, total_steps // 4)
    warmup_steps = min(warmup_steps, total_steps - 1)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if name == "constant":
        return 1.0
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    if name == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if name in ("onecycle", "linear"):
        return 1.0 - progress
    raise ValueError(f"unknown schedule {name}")  # config validation makes this unreachable


def build_scheduler(cfg: ScheduleConfig, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The recipe's schedule for every group, except groups marked `until_step` (see optim.build_optimizer): those
    fall linearly from 1 to 0 at that step, where their parameters stop training."""
    # Not passed through accelerator.prepare: a prepared scheduler steps once per process per call.
    def factor(group):
        if "until_step" in group:
            return lambda step, until=group["until_step"]: max(0.0, 1.0 - step / until)
        return lambda step: lr_factor(cfg.name, step, total_steps, cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g) for g in optimizer.param_groups])
