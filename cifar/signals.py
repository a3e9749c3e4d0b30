"""Turn SIGTERM / SIGINT / SIGUSR1 into a stop request that every rank agrees on at a step boundary.

SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@N`) and SIGTERM on preemption; Ctrl-C is SIGINT.
Any rank may receive the signal (launchers do not forward signals reliably), so the flag is all-reduced: when
one rank asks, all stop after the same step, save one checkpoint and exit with EXIT_RESUMABLE.
A second SIGINT exits at once (a person pressing Ctrl-C twice means it). Repeated SIGTERM/SIGUSR1, which
launchers and SLURM send to every process of a job, are absorbed: they must not cut a checkpoint short.
"""
from __future__ import annotations

import os
import signal
import sys

import torch

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            print("\ninterrupted twice: exiting now, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(130)
        if self.signal is None:
            self.signal = signum
            print(f"\n{signal.Signals(signum).name} received: stopping at the next step boundary to save a "
                  f"checkpoint", file=sys.stderr, flush=True)

    def agreed(self, accelerator) -> bool:
        """True on every rank when any rank was signalled (and then every rank knows which signal).
        One tiny all-reduce per call when there are several ranks."""
        if accelerator.num_processes > 1:
            flag = torch.tensor([float(self.signal or 0)], device=accelerator.device)
            self.seen = int(accelerator.reduce(flag, "max").item()) or None
        else:
            self.seen = self.signal
        return self.seen is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.seen).name if getattr(self, "seen", None) else "no signal"
