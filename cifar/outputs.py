"""The run folder: config.yaml, metrics.jsonl, summary.json, model.safetensors. Main process only."""
from __future__ import annotations

import json
import math
import os
import time

import torch

from .checkpoint import WEIGHTS
from .config import Config
from .files import save_weights, write_atomic


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


def to_json(obj) -> str:
    return json.dumps(_clean(obj), allow_nan=False)


class RunWriter:
    def __init__(self, output_dir: str, cfg: Config, resume_step: int | None = None):
        """A fresh run starts metrics.jsonl anew; a resumed one keeps the rows up to its checkpoint's step, so
        rows logged after that checkpoint by the interrupted run are not repeated."""
        self.dir = output_dir
        os.makedirs(output_dir, exist_ok=True)
        write_atomic(os.path.join(output_dir, "config.yaml"), cfg.to_yaml().encode())
        path = os.path.join(output_dir, "metrics.jsonl")
        kept = b""
        if resume_step is not None and os.path.exists(path):
            with open(path, "rb") as f:
                kept = b"".join(line for line in f if _row_step(line) is not None and _row_step(line) <= resume_step)
        write_atomic(path, kept)
        self._metrics = open(path, "a")

    def log(self, row: dict) -> None:
        self._metrics.write(to_json(row) + "\n")
        self._metrics.flush()

    def save_weights(self, model: torch.nn.Module) -> None:
        save_weights(model, os.path.join(self.dir, WEIGHTS))

    def save_summary(self, summary: dict) -> None:
        write_atomic(os.path.join(self.dir, "summary.json"), (json.dumps(_clean(summary), indent=2) + "\n").encode())

    def status(self, state: str, **fields) -> None:
        """status.json: running | stopped (resumable: rerun the same command) | finished | failed. Batch scripts
        read it, since launchers report a rank's exit code as their own failure. A kill leaves 'running'."""
        record = {"state": state, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "pid": os.getpid(), **fields}
        write_atomic(os.path.join(self.dir, "status.json"), (to_json(record) + "\n").encode())

    def close(self) -> None:
        self._metrics.close()
