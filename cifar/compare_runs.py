"""What python -m cifar.compare reads from a run folder (config.yaml, metrics.jsonl, status.json, summary.json, the
newest checkpoint's state.json), and which run folders an argument names: a run, a sweep folder's runs, a glob's."""
from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass, field

import numpy as np
import yaml

from . import run_folder, yaml_io
from .errors import UserError
from .nested import flatten
from .run_folder import CONFIG, METRICS, read_status, read_summary

IGNORED = {"output_dir", "wandb.name", "wandb.tags", "wandb.notes"}  # name a run; they do not change what it does


@dataclass
class RunRecord:
    """What a finished or running run folder records (config, summary, metrics rows, status), as compare reads it;
    engine.Run is a training in progress, sweep_plan.PlannedRun one a sweep will make."""
    path: str
    name: str
    config: dict
    summary: dict | None      # None: no summary.json (running, stopped or crashed)
    rows: list[dict]          # metrics.jsonl, in order
    status: dict | None = None                       # status.json; None when absent or half-written
    settings: dict = field(default_factory=dict)     # what the run was told to do (settings_of)
    state: str = run_folder.NEW                      # run_folder.state: running, finished, killed...

    def epochs(self) -> list[dict]:
        """Per-epoch rows, one per epoch (the last written wins, so a resumed run counts each epoch once)."""
        by_epoch = {r["epoch"]: r for r in self.rows if "epoch_time" in r and "epoch" in r}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global step, training seconds, value) of a metric, sorted by step."""
        epochs = self.epochs()
        if any(metric in r for r in epochs):
            points = [r for r in epochs if metric in r]
        else:  # a per-step metric such as train/loss: one point per step, the last written wins
            points = list({r["step"]: r for r in self.rows if metric in r and "epoch_time" not in r}.values())
        points = [r for r in sorted(points, key=lambda r: r["step"]) if isinstance(r[metric], (int, float))]
        steps = np.array([r["step"] for r in points], dtype=float)
        ends = np.array([0] + [r["step"] for r in epochs], dtype=float)
        times = np.cumsum([0.0] + [r["epoch_time"] or 0.0 for r in epochs])
        return steps, np.interp(steps, ends, times), np.array([r[metric] for r in points], dtype=float)

    def status_text(self) -> str:
        error = " ".join(str((self.status or {}).get("error") or "").split())
        if self.state in (run_folder.FAILED, run_folder.SAVE_FAILED) and error:
            return f"{self.state}: {error[:60]}{'…' if len(error) > 60 else ''}"
        return self.state

    def outcome(self, metric: str) -> dict:
        """What the run reached: summary.json's numbers once finished, else what metrics.jsonl has so far."""
        s, epochs, values = self.summary or {}, self.epochs(), self.curve(metric)[2]
        return {"best": float(values.min() if "loss" in metric else values.max()) if len(values) else None,
                "final": float(values[-1]) if len(values) else None,
                "steps": s.get("steps", max((r["step"] for r in self.rows), default=None)),
                "time": s.get("wall_seconds", sum(r.get("epoch_time") or 0.0 for r in epochs) if epochs else None),
                "images_per_sec": s.get("images_per_sec", epochs[-1].get("images_per_sec") if epochs else None)}


def settings_of(run: RunRecord) -> dict:
    """The flattened config without the keys that only name the run, plus `processes`: the same recipe on 2
    processes (twice the global batch) is another experiment. summary.json has it once finished, status.json while
    running; a failed run's status.json does not, its newest checkpoint does."""
    settings = {k: v for k, v in flatten(run.config, ".", keep_none=True).items() if k not in IGNORED}
    for read in (lambda: run.summary, lambda: run.status, lambda: run_folder.latest_state(run.path)):
        if isinstance(processes := (read() or {}).get("world_size"), int):
            settings["processes"] = processes
            break
    return settings


def read_run(path: str) -> RunRecord:
    """A run folder's records (trained.load_trained is the other reader: a run's network, for inference)."""
    config_path = os.path.join(path, CONFIG)
    if not os.path.isfile(config_path):
        raise UserError(f"{path} is not a run folder (no config.yaml); pass folders written by train.py, "
                        f"e.g. runs/<name>-<time>, or a sweep folder that holds them")
    try:
        with open(config_path) as f:
            config = yaml_io.safe_load(f, config_path) or {}
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):
        raise UserError(f"{config_path} is not a run's config (YAML keys); is {path} a run folder written by "
                        f"train.py?")
    rows = []
    if os.path.isfile(os.path.join(path, METRICS)):
        with open(os.path.join(path, METRICS)) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
                    rows.append(row)
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    run = RunRecord(path, name, config, read_summary(path), rows, read_status(path), state=run_folder.state(path))
    run.settings = settings_of(run)
    return run


def _runs_in(path: str) -> list[str]:
    """A run folder itself, or the run folders directly in a (sweep) folder, in name order."""
    if os.path.isfile(os.path.join(path, CONFIG)):
        return [path]
    if not os.path.isdir(path):
        return []
    children = (os.path.join(path, name) for name in sorted(os.listdir(path)))
    return [c for c in children if os.path.isfile(os.path.join(c, CONFIG))]


def run_folders(arg: str) -> list[str]:
    """The run folders one argument names: a run, a sweep folder's runs, or (when no such path exists) a glob's."""
    if not os.path.exists(arg) and re.search(r"[*?[]", arg):
        found = [path for match in sorted(glob.glob(arg)) for path in _runs_in(match)]
        if not found:
            raise UserError(f"{arg} matches no run folder; check the pattern (quote it, e.g. 'runs/debug-*')")
        return found
    return _runs_in(arg) or [arg]  # not a run folder: read_run says so
