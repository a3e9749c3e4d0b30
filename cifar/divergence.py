"""Divergence caught before it is saved: weights (and their moving average) are checked before every checkpoint and
before the final weights are written, evaluations' losses as they come, the training loss whenever it is summed
(step.StepStats.totals). A diverged run ends with one line, exit 2 (errors.Diverged), status.json `failed` with the
reason; `best`, `latest`, model.safetensors and every checkpoint keep finite weights, and the newest checkpoint is
the last good one.
"""
from __future__ import annotations

import math
import os

import torch

from .errors import Diverged

# Weights beyond this magnitude count as diverged: 1.8e19, the square root of float32's largest value. Their square
# (a norm, the L2 penalty, the product of two of them in a forward pass) is already inf: a weight of 1e37 is still
# finite, but it is the step before an inf, and a checkpoint holding it cannot be trained on, at any lr.
LIMIT = math.sqrt(torch.finfo(torch.float32).max)
FIX = "lower optim.lr or set train.grad_clip, then rerun: it resumes from that checkpoint"


def check_weights(models: dict[str, torch.nn.Module], step: int, latest: str | None) -> None:
    """Raise Diverged when a floating-point tensor of any of `models` ({"weight": model, "moving-average weight":
    ema}) holds a NaN, an inf or a value beyond LIMIT. Every rank holds the same weights, so every rank raises."""
    for what, model in models.items():
        for name, tensor in model.state_dict().items():
            if tensor.is_floating_point() and not bool((tensor.abs() <= LIMIT).all()):
                peak = float(tensor.detach().abs().max())
                found = f"reaches {peak:.3g}" if math.isfinite(peak) else "is not finite"
                raise Diverged(f"training diverged at step {step}: {what} {name} {found}; not saved, "
                               f"{_kept(latest)}; {FIX}")


def check_loss(loss: float, what: str, step: int, latest: str | None) -> None:
    """Raise Diverged when an evaluation's loss is not finite."""
    if not math.isfinite(loss):
        raise Diverged(f"training diverged at step {step}: {what} is {loss}; not saved, {_kept(latest)}; {FIX}")


def _kept(latest: str | None) -> str:
    return f"the newest checkpoint {latest} is the last good one" if latest else "no checkpoint was saved before"


# The test suite's faults (CIFAR_FAULT=<name>:<step>): the weights times inf, as an exploding update would leave them,
# or times 1e30, finite but absurd.
_FAULTS = {"poison-weights": math.inf, "inflate-weights": 1e30}


def blow_up_fault(model: torch.nn.Module, step: int) -> None:
    """For the divergence tests: CIFAR_FAULT=poison-weights:<step> (or inflate-weights:<step>) blows the weights up
    right after optimizer step <step>, so that the real detection path is what the tests exercise."""
    name, _, at = os.environ.get("CIFAR_FAULT", "").partition(":")
    if name in _FAULTS and at == str(step):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(_FAULTS[name])
