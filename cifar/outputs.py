"""What a training run writes into its run folder (config.yaml, metrics.jsonl, status.json, summary.json, the final
weights: names and states in cifar/run_folder.py), and how it claims the folder. Main process only."""
from __future__ import annotations

import contextlib
import json
import math
import os
import time

import torch

from . import log
from .checkpoint import choose_resume
from .config import CheckpointConfig, Config
from .errors import warn
from .files import fsync_dir, save_weights, write_atomic
from .lock import RunLock
from .run_folder import (CHECKPOINTS, CONFIG, EMA_WEIGHTS, METRICS, OUTPUTS, STATUS, SUMMARY, WEIGHTS,
                         remove_leftovers)


def claim_run_dir(run_dir: str, policy: CheckpointConfig, lock: RunLock, vet=None) -> str | None:
    """Lock the run folder, then pick the checkpoint to resume from (None: start fresh) and have vet(checkpoint)
    refuse it while nothing is written yet. The temporary files a killed writer left are removed (no other writer
    can be running now). A fresh start, or one from another folder's checkpoint, first moves this folder's earlier
    outputs into previous-<time>/."""
    lock.acquire()
    resume = choose_resume(run_dir, policy)
    if resume is not None and vet is not None:
        vet(resume)
    lock.record()
    removed = remove_leftovers(run_dir)
    if removed:
        log.debug(f"removed what a killed run left half-written in {run_dir}: {', '.join(removed)}")
    own = os.path.join(os.path.abspath(run_dir), CHECKPOINTS) + os.sep
    if resume is None or not os.path.abspath(resume).startswith(own):
        moved_to = set_aside(run_dir)
        if moved_to:
            warn(f"{run_dir} held an earlier run's outputs; they are now in {moved_to}")
    return resume


def set_aside(run_dir: str) -> str | None:
    """Move the earlier outputs in run_dir into run_dir/previous-<time>/; its path, or None when there were none."""
    found = [name for name in OUTPUTS if os.path.lexists(os.path.join(run_dir, name))]
    if not found:
        return None
    stamp, n = time.strftime("%Y%m%d-%H%M%S"), 1
    target = os.path.join(run_dir, f"previous-{stamp}")
    while os.path.lexists(target):
        n += 1
        target = os.path.join(run_dir, f"previous-{stamp}-{n}")
    os.makedirs(target)
    for name in found:
        os.rename(os.path.join(run_dir, name), os.path.join(target, name))
    fsync_dir(target)
    fsync_dir(run_dir)
    return target


def _clean(value):
    """JSON has no NaN/inf: write them as null rather than produce a file other tools refuse."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _row_step(line: bytes) -> int | None:
    """The step of a metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None


@contextlib.contextmanager
def _naming(path: str):
    """A failed write in the block names the file meant (write_atomic's error names its temporary file, a failed
    flush none), as the error line shows it."""
    try:
        yield path
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def _write(path: str, data: bytes) -> None:
    with _naming(path):
        write_atomic(path, data)


def _before_resume(line: bytes, resume_step: int) -> bool:
    """Whether a metrics.jsonl line was written before the checkpoint at resume_step: its step is no later, and it
    is not the config_changes row of an earlier resumption from that same checkpoint (this one writes its own)."""
    step = _row_step(line)
    return step is not None and (step < resume_step or step == resume_step and "config_changes" not in json.loads(line))


def to_json(obj) -> str:
    return json.dumps(_clean(obj), allow_nan=False)


class RunWriter:
    def __init__(self, output_dir: str, cfg: Config, resume_step: int | None = None):
        """metrics.jsonl is only appended to, or cut back to the resumed checkpoint's step, so that rows logged
        after that checkpoint by the interrupted run are not repeated (a fresh start finds it set aside)."""
        self.dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        _write(os.path.join(output_dir, CONFIG), cfg.to_yaml().encode())
        path = os.path.join(output_dir, METRICS)
        if resume_step is not None and os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.readlines()
            kept = [line for line in lines if _before_resume(line, resume_step)]
            if kept != lines:
                _write(path, b"".join(kept))
        self._metrics = open(path, "a")

    def log(self, row: dict) -> None:
        with _naming(self._metrics.name):       # a failed flush names no file
            self._metrics.write(to_json(row) + "\n")
            self._metrics.flush()

    def save_weights(self, model: torch.nn.Module, ema=None) -> None:
        """The final weights, their header saying which they are; with train.ema, the average beside them."""
        with _naming(os.path.join(self.dir, WEIGHTS)) as path:
            save_weights(model, path, {"weights": "trained"})
        if ema is not None:
            with _naming(os.path.join(self.dir, EMA_WEIGHTS)) as path:
                save_weights(ema.module, path, {"weights": "ema", "ema_decay": str(ema.decay),
                                                "ema_updates": str(ema.updates)})

    def save_summary(self, summary: dict) -> None:
        _write(os.path.join(self.dir, SUMMARY), (json.dumps(_clean(summary), indent=2) + "\n").encode())

    def status(self, state: str, **fields) -> None:
        """status.json: running | stopped | finished | failed | save-failed (run_folder.STATES). A kill leaves
        'running', which readers tell from a live run by the lock (run_folder.state)."""
        record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **fields}
        _write(os.path.join(self.dir, STATUS), (to_json(record) + "\n").encode())

    def close(self) -> None:
        self._metrics.close()
