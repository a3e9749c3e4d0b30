"""Turn SIGTERM / SIGINT / SIGUSR1 into a stop request that every rank agrees on at a step boundary.

SLURM sends SIGUSR1 before the time limit (`--signal=B:USR1@N`) and SIGTERM on preemption; Ctrl-C is SIGINT.
Any rank may receive the signal (launchers do not forward signals reliably), so the flag is all-reduced: when
one rank asks, all stop after the same step, save one checkpoint and exit with EXIT_RESUMABLE.
A second SIGINT exits at once (a person pressing Ctrl-C twice means it). Repeated SIGTERM/SIGUSR1, which
launchers and SLURM send to every process of a job, are absorbed: they must not cut a checkpoint short.

Start-up work that may wait for minutes with nothing to save (a dataset download) runs `interruptible`: there a
signal ends the process at once, with the same exit status (EXIT_RESUMABLE: rerunning the same command starts
again cleanly, as nothing was half-written) instead of waiting for a first step that a hung download never reaches.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from contextlib import contextmanager

import torch

from .errors import Stopped

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class StopRequest:
    active: "StopRequest | None" = None      # the one installed now, if any: `interruptible` reads its flag

    def __init__(self):
        self.signal: int | None = None
        self._previous = {}

    def install(self) -> "StopRequest":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        StopRequest.active = self
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        if StopRequest.active is self:
            StopRequest.active = None

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


@contextmanager
def interruptible(what: str):
    """While `what` runs, SIGTERM / SIGINT / SIGUSR1 raise Stopped where the process waits (a socket read: Python
    runs the handler and the read gives up), rather than set a flag for a step boundary far away. A signal that
    came earlier in start-up ends it before `what` begins. Outside the main thread, where no handler can be set,
    it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    earlier = StopRequest.active.signal if StopRequest.active else None
    if earlier:
        raise Stopped(_before_training(earlier, what))
    fired = []

    def stop_now(signum, frame):
        if not fired:                    # one exception: a repeated signal must not interrupt the cleanup
            fired.append(signum)
            raise Stopped(_before_training(signum, what))

    previous = {sig: signal.signal(sig, stop_now) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _before_training(signum: int, what: str) -> str:
    return (f"{signal.Signals(signum).name} received while {what}, before training began: nothing to save and "
            f"nothing half-written; rerun the same command to start again")
