"""An exponential moving average of the weights (train.ema), kept beside them with PyTorch's own AveragedModel.

Every rank keeps the same average (DDP keeps the weights equal on every rank), so it is evaluated like the model:
each rank its shard, the sums all-reduced. Buffers (BatchNorm's running statistics) are averaged too.
"""
from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .config import EmaConfig


class Ema:
    def __init__(self, cfg: EmaConfig, model: torch.nn.Module):
        self.decay, self.every = cfg.decay, cfg.every_steps
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.decay), use_buffers=True)

    @property
    def module(self) -> torch.nn.Module:
        """The averaged network: evaluated, saved (as a plain state_dict: it loads into the model like its
        weights) and exported like the model itself."""
        return self.averaged.module

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        """Fold the weights in after optimizer step `step`, every train.ema.every_steps steps."""
        if step % self.every == 0:
            self.averaged.update_parameters(model)

    @property
    def updates(self) -> int:
        """How many times the weights were folded in (0: the average is still the weights it started from)."""
        return int(self.averaged.n_averaged.item())

    def restore(self, state: dict, updates: int) -> None:
        """Put back a saved average: its state_dict (as `module`'s) and its number of updates."""
        self.module.load_state_dict(state)
        self.averaged.n_averaged.fill_(updates)


def build_ema(cfg: EmaConfig, model: torch.nn.Module) -> Ema | None:
    """The moving average of `model` (the unwrapped one) when train.ema.decay is set, else None."""
    return Ema(cfg, model) if cfg.decay is not None else None
