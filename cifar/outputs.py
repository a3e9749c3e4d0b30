"""The run folder: config.yaml, metrics.jsonl, summary.json, model.safetensors. Main process only."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .checkpoint import EMA_WEIGHTS, WEIGHTS, choose_resume
from .config import CheckpointConfig, Config
from .errors import warn
from .files import fsync_dir, save_weights, write_atomic
from .lock import RunLock

# What train.py and evaluate.py write into a run folder: a fresh start moves these aside, never deletes them.
OUTPUTS = ("checkpoints", "config.yaml", "metrics.jsonl", "status.json", "summary.json", WEIGHTS, EMA_WEIGHTS,
           "eval.json", "confusion.png", "predictions.png", "wandb")


def claim_run_dir(run_dir: str, policy: CheckpointConfig, lock: RunLock, vet=None) -> str | None:
    """Lock the run folder, then pick the checkpoint to resume from (None: start fresh) and have vet(checkpoint)
    refuse it while nothing is written yet. A fresh start, or one from another folder's checkpoint, first moves this
    folder's earlier outputs into previous-<time>/."""
    lock.acquire()
    resume = choose_resume(run_dir, policy)
    if resume is not None and vet is not None:
        vet(resume)
    lock.record()
    own = os.path.join(os.path.abspath(run_dir), "checkpoints") + os.sep
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
        write_atomic(os.path.join(output_dir, "config.yaml"), cfg.to_yaml().encode())
        path = os.path.join(output_dir, "metrics.jsonl")
        if resume_step is not None and os.path.exists(path):
            with open(path, "rb") as f:
                lines = f.readlines()
            kept = [line for line in lines if _before_resume(line, resume_step)]
            if kept != lines:
                write_atomic(path, b"".join(kept))
        self._metrics = open(path, "a")

    def log(self, row: dict) -> None:
        self._metrics.write(to_json(row) + "\n")
        self._metrics.flush()

    def save_weights(self, model: torch.nn.Module, ema=None) -> None:
        """The final weights, their header saying which they are; with train.ema, the average beside them."""
        save_weights(model, os.path.join(self.dir, WEIGHTS), {"weights": "trained"})
        if ema is not None:
            save_weights(ema.module, os.path.join(self.dir, EMA_WEIGHTS),
                         {"weights": "ema", "ema_decay": str(ema.decay), "ema_updates": str(ema.updates)})

    def save_summary(self, summary: dict) -> None:
        write_atomic(os.path.join(self.dir, "summary.json"), (json.dumps(_clean(summary), indent=2) + "\n").encode())

    def status(self, state: str, **fields) -> None:
        """status.json: running | stopped (resumable: rerun the same command) | finished | failed. Batch scripts
        read it, since launchers report a rank's exit code as their own failure. A kill leaves 'running'."""
        record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **fields}
        write_atomic(os.path.join(self.dir, "status.json"), (to_json(record) + "\n").encode())

    def close(self) -> None:
        self._metrics.close()
