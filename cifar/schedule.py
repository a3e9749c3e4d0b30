"""Learning-rate schedules counted in optimizer steps (never micro-batches), so that under gradient
accumulation the last optimizer step of the run lands exactly on the schedule's end value.

A schedule is its shape after the warmup: @SCHEDULES.register("name") on a function of the progress through the
steps after the warmup (0 at the first, 1 at the last) that returns the factor of the base LR. register's
warmup=<fraction> gives the schedule a warmup of that fraction of the steps when schedule.warmup_steps is 0."""
from __future__ import annotations

import math

import torch

from .registry import Registry

SCHEDULES = Registry("schedule", "schedule.name")


@SCHEDULES.register("constant")
def constant(progress: float) -> float:
    return 1.0


@SCHEDULES.register("cosine")
def cosine(progress: float) -> float:
    """A half cosine to 0."""
    return 0.5 * (1 + math.cos(math.pi * progress))


@SCHEDULES.register("onecycle", warmup=0.25)
def onecycle(progress: float) -> float:
    """Up over the first 25% of the steps (unless schedule.warmup_steps says otherwise), then linearly to 0."""
    return 1.0 - progress


@SCHEDULES.register("linear")
def linear(progress: float) -> float:
    """Linearly to 0, without a warmup unless told."""
    return 1.0 - progress


def lr_factor(name: str, step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base LR for optimizer step `step` (0-based) of `total_steps`.

    Warmup rises linearly to 1 over `warmup_steps` (or, when 0, over the schedule's own warmup fraction of the
    steps); then the schedule's shape, reaching its end at step total_steps - 1.
    """
    if warmup_steps == 0 and (fraction := SCHEDULES.meta.get(name, {}).get("warmup")):
        warmup_steps = max(1, int(total_steps * fraction))
    warmup_steps = min(warmup_steps, total_steps - 1)
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = total_steps - 1 - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    return SCHEDULES[name](progress)


def build_scheduler(cfg, optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The schedule cfg (the ScheduleConfig) names, for every group, except groups marked `until_step` (see
    optim.build_optimizer): those fall linearly from 1 to 0 at that step, where their parameters stop training."""
    # Not passed through accelerator.prepare: a prepared scheduler steps once per process per call.
    def factor(group):
        if "until_step" in group:
            return lambda step, until=group["until_step"]: max(0.0, 1.0 - step / until)
        return lambda step: lr_factor(cfg.name, step, total_steps, cfg.warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [factor(g) for g in optimizer.param_groups])
