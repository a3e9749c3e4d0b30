"""Checkpoints that survive a kill at any instant.

Layout: <run>/checkpoints/step-<global step>/ with model.safetensors (weights), training.pt (optimizer, scheduler,
grad scaler, every rank's RNG states; loaded with weights_only=True), state.json (where the loop stands, best metric,
W&B run id, the resolved config) and manifest.json (size and SHA-256 of every file), plus `latest` and `best`
pointer files. Only the main process touches the folder. A checkpoint is written into a temporary folder beside its
final place, fsynced, then renamed; the pointers are replaced atomically after the rename; old checkpoints are
pruned only after that. Resume takes the newest checkpoint whose manifest verifies and says which it skipped.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import sys
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from .config import Config
from .errors import UserError

STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Where the loop stands. Everything else it needs is rebuilt from the config."""
    epoch: int = 0                   # epoch to continue in
    samples_in_epoch: int = 0        # global samples of `epoch` already trained on
    step: int = 0                    # global optimizer steps taken
    best_acc: float | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0        # test-set evaluations, kept out of train_seconds
    samples_seen: int = 0
    global_batch: int = 0            # batch_size x processes x grad_accum_steps of the run that saved
    world_size: int = 1
    epoch_sums: list = field(default_factory=lambda: [0.0, 0, 0])   # loss sum, correct, samples (all ranks)
    log_sums: list = field(default_factory=lambda: [0.0, 0, 0])
    wandb_run_id: str | None = None
    time_to_target: float | None = None      # training seconds when train.target_acc was first reached
    steps_to_target: int | None = None


# ----------------------------------------------------------------------------- files

def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_pointer(folder: str, name: str, target: str) -> None:
    tmp = os.path.join(folder, f".{name}.tmp")
    with open(tmp, "w") as f:
        f.write(target + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(folder, name))


def read_pointer(folder: str, name: str) -> str | None:
    try:
        with open(os.path.join(folder, name)) as f:
            target = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(folder, target) if STEP_DIR.match(target) else None


def verify(path: str) -> str | None:
    """None when the checkpoint is complete and intact, else what is wrong with it."""
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        return "no manifest (the save did not finish)"
    except (json.JSONDecodeError, UnicodeDecodeError):
        return "manifest unreadable"
    for name, meta in manifest.get("files", {}).items():
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            return f"{name} missing"
        if os.path.getsize(file) != meta["size"]:
            return f"{name} truncated ({os.path.getsize(file)} of {meta['size']} bytes)"
        if _sha256(file) != meta["sha256"]:
            return f"{name} corrupted (SHA-256 mismatch)"
    return None if manifest.get("files") else "empty manifest"


def step_of(path: str) -> int:
    return int(STEP_DIR.match(os.path.basename(os.path.normpath(path))).group(1))


# ----------------------------------------------------------------------------- RNG

def rng_state() -> dict:
    """This process's RNG states as numpy arrays and plain values: they cross ranks with gather_object (pickle)
    and become tensors in training.pt, which loads with weights_only=True."""
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state().numpy(),
            "cuda": [s.numpy() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
            "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
            "numpy": [np_state[0], np_state[1].copy(), *np_state[2:]]}


def _as_tensors(state: dict) -> dict:
    return {"torch": torch.from_numpy(state["torch"]), "cuda": [torch.from_numpy(s) for s in state["cuda"]],
            "python": state["python"], "numpy": [state["numpy"][0], torch.from_numpy(state["numpy"][1]),
                                                 *state["numpy"][2:]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


# ----------------------------------------------------------------------------- the manager

class Checkpoints:
    def __init__(self, run_dir: str, cfg: Config, is_main: bool):
        self.folder = os.path.join(run_dir, "checkpoints")
        self.cfg = cfg
        self.policy = cfg.checkpoint
        self.is_main = is_main

    # -- finding

    def list(self) -> list[str]:
        """Completed (renamed) checkpoint folders, newest first. Validity is checked separately."""
        if not os.path.isdir(self.folder):
            return []
        names = [n for n in os.listdir(self.folder) if STEP_DIR.match(n)]
        return [os.path.join(self.folder, n) for n in sorted(names, key=lambda n: -step_of(n))]

    def newest_valid(self, candidates: list[str] | None = None) -> str | None:
        for path in self.list() if candidates is None else candidates:
            problem = verify(path)
            if problem is None:
                return path
            warn(f"checkpoint {path} is unusable ({problem}); trying an older one")
        return None

    def resume_path(self) -> str | None:
        """The checkpoint this run continues from, per checkpoint.resume; None to start fresh."""
        resume = self.policy.resume
        if resume == "never":
            if self.list() and not self.policy.overwrite:
                raise UserError(f"{self.folder} already holds checkpoints and checkpoint.resume=never; use "
                                f"checkpoint.resume=auto to continue, checkpoint.overwrite=true to start over, or "
                                f"another output_dir")
            if self.is_main and os.path.isdir(self.folder):
                shutil.rmtree(self.folder)
            return None
        if resume == "auto":
            return self.newest_valid()
        path = os.path.abspath(resume)
        if os.path.isdir(os.path.join(path, "checkpoints")):      # a run folder: its newest valid checkpoint
            found = Checkpoints(path, self.cfg, False).newest_valid()
            if found is None:
                raise UserError(f"no usable checkpoint in {path}/checkpoints; pass a step-<N> folder or "
                                f"checkpoint.resume=never")
            return found
        if not os.path.isdir(path) or not STEP_DIR.match(os.path.basename(path)):
            raise UserError(f"checkpoint.resume={resume} is not a checkpoint folder (step-<N>) or a run folder; "
                            f"use auto, never or an existing path")
        problem = verify(path)
        if problem:
            raise UserError(f"checkpoint {path} is unusable ({problem}); pick another step-<N> folder")
        return path

    # -- saving

    def save(self, state: TrainState, model, optimizer, scheduler, scaler, rng_states: list, acc: float | None
             ) -> str | None:
        """Write step-<state.step> atomically (main process only), then update pointers and prune."""
        if not self.is_main:
            return None
        os.makedirs(self.folder, exist_ok=True)
        name = f"step-{state.step}"
        final = os.path.join(self.folder, name)
        if os.path.isdir(final) and verify(final) is None:
            return final                                  # already saved at this step (e.g. epoch end + signal)
        tmp = os.path.join(self.folder, f".tmp-{name}-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, os.path.join(tmp, "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict() if scaler is not None else None,
                    "rng": [_as_tensors(r) for r in rng_states]},
                   os.path.join(tmp, "training.pt"))
        _fault_point("kill-during-save", state.step)
        with open(os.path.join(tmp, "state.json"), "w") as f:
            json.dump({"state": asdict(state), "test_acc": acc, "config": self.cfg.to_dict()}, f, indent=1)
        with open(os.path.join(tmp, "config.yaml"), "w") as f:
            f.write(self.cfg.to_yaml())
        files = {}
        for file in sorted(os.listdir(tmp)):
            path = os.path.join(tmp, file)
            _fsync_file(path)
            files[file] = {"size": os.path.getsize(path), "sha256": _sha256(path)}
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump({"step": state.step, "files": files}, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        _fsync_dir(tmp)
        if os.path.isdir(final):                          # an invalid leftover with the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(self.folder)
        _write_pointer(self.folder, "latest", name)
        self._prune()
        _fault_point("kill-after-save", state.step)
        return final

    def _prune(self) -> None:
        """Keep the newest keep_last and the best keep_best (by test accuracy); remove the rest and stale temps."""
        done = self.list()
        keep = set(done[: self.policy.keep_last])
        scored = [(acc, step_of(p), p) for p in done if (acc := _saved_acc(p)) is not None]
        best = [p for _, _, p in sorted(scored, reverse=True)[: self.policy.keep_best]]
        keep.update(best)
        if best:
            _write_pointer(self.folder, "best", os.path.basename(best[0]))
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.folder):
            if name.startswith(".tmp-step-") and not name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    # -- loading

    def load(self, path: str, model, optimizer, scheduler, scaler, rank: int) -> TrainState:
        with open(os.path.join(path, "state.json")) as f:
            saved = json.load(f)
        theirs, ours = saved["config"]["model"]["name"], self.cfg.model.name
        if theirs != ours:
            raise UserError(f"checkpoint {path} is for model {theirs}, this run is model {ours}; resume with "
                            f"model.name={theirs}, or start over with checkpoint.resume=never and another output_dir")
        weights = load_file(os.path.join(path, "model.safetensors"))
        own = model.state_dict()
        wrong = sorted(k for k in own if k not in weights or weights[k].shape != own[k].shape)
        if wrong or weights.keys() - own.keys():
            first = (wrong or sorted(weights.keys() - own.keys()))[0]
            raise UserError(f"checkpoint {path} does not fit this model's shape (first mismatch: {first}); "
                            f"resume with the config it was saved with")
        model.load_state_dict(weights)
        changed = config_changes(saved["config"], self.cfg.to_dict())
        if changed and self.is_main:
            warn(f"resuming {path} with a different config ({'; '.join(changed[:4])}); the checkpoint's optimizer "
                 f"and schedule state are restored as saved")
        training = torch.load(os.path.join(path, "training.pt"), map_location="cpu", weights_only=True)
        try:
            optimizer.load_state_dict(training["optimizer"])
        except ValueError as e:      # another number or size of parameter groups
            raise UserError(f"checkpoint {path} has optimizer state for other parameter groups ({e}); resume with "
                            f"the optim and model settings it was saved with") from None
        scheduler.load_state_dict(training["scheduler"])
        if scaler is not None and training["scaler"] is not None:
            scaler.load_state_dict(training["scaler"])
        if rank < len(training["rng"]):
            set_rng_state(training["rng"][rank])
        return TrainState(**saved["state"])


# Keys that may change between an interrupted run and its resumption without changing the training trajectory.
_FREE_TO_CHANGE = ("output_dir", "checkpoint.", "wandb.", "data.root", "data.download", "data.num_workers",
                   "data.eval_batch_size", "train.log_every_steps", "train.eval_every_epochs")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_changes(saved: dict, current: dict) -> list[str]:
    a, b = _flatten(saved), _flatten(current)
    return [f"{k}: {a.get(k)} -> {b.get(k)}" for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(_FREE_TO_CHANGE)]


def _saved_acc(path: str) -> float | None:
    try:
        with open(os.path.join(path, "state.json")) as f:
            return json.load(f).get("test_acc")
    except (OSError, json.JSONDecodeError):
        return None


def _fault_point(name: str, step: int) -> None:
    """For the crash tests: CIFAR_FAULT=<name>:<step> SIGKILLs this process here, as a node failure would."""
    if os.environ.get("CIFAR_FAULT") == f"{name}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
