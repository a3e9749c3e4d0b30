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
import io
import json
import os
import pickle
import random
import shutil
import signal
import sys
import time
from dataclasses import asdict, dataclass, field, fields

import numpy as np
import torch
from accelerate.utils import gather_object
from safetensors.torch import load_file

from . import log
from .config import Config
from .errors import SaveFailed, UserError, warn, write_advice
from .files import (fsync_dir, load_tensors_only, load_weights, refused_global, sha256, weights_bytes,
                    write_durable)
from .run_folder import BEST, CHECKPOINTS, CONFIG, EMA_WEIGHTS, LATEST, STEP_DIR, WEIGHTS, read_pointer
from .runtime import on_main
from .worlds import rng_source

MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """Where the loop stands. Everything else it needs is rebuilt from the config."""
    epoch: int = 0                   # epoch to continue in
    samples_in_epoch: int = 0        # global samples of `epoch` already trained on
    step: int = 0                    # global optimizer steps taken
    best_acc: float | None = None
    best_ema_acc: float | None = None        # of the moving average (train.ema)
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
    lr: float | None = None                  # group 0's lr in the last optimizer step (an epoch row reports it)
    # keys changed on resume and applied from then on (cifar/resume.py): {"step", "key", "from", "to"} each
    config_changes: list = field(default_factory=list)
    # model.init_from: the weights file the run started from, its SHA-256, the tensors not loaded (cifar/finetune.py)
    init_from: dict | None = None


# ----------------------------------------------------------------------------- files

def _write_pointer(folder: str, name: str, target: str) -> None:
    tmp = os.path.join(folder, f".{name}.tmp")
    write_durable(tmp, (target + "\n").encode())
    os.replace(tmp, os.path.join(folder, name))


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
        if sha256(file) != meta["sha256"]:
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

def list_checkpoints(folder: str) -> list[str]:
    """Completed (renamed) checkpoint folders in `folder`, newest first. Validity is checked separately."""
    if not os.path.isdir(folder):
        return []
    names = [n for n in os.listdir(folder) if STEP_DIR.match(n)]
    return [os.path.join(folder, n) for n in sorted(names, key=lambda n: -step_of(n))]


def newest_valid(folder: str) -> str | None:
    """The newest checkpoint in `folder` whose manifest verifies, warning about each newer one that does not. When
    there are checkpoints and none verifies: one line listing each and why, and the choices (never a silent fresh
    start over a run's history)."""
    problems = []
    for path in list_checkpoints(folder):
        problem = verify(path)
        if problem is None:
            for name, why in problems:
                warn(f"checkpoint {os.path.join(folder, name)} is unusable ({why}); resuming from the older "
                     f"{os.path.basename(path)}")
            return path
        problems.append((os.path.basename(path), problem))
    if problems:
        listed = "; ".join(f"{name}: {why}" for name, why in problems)
        raise UserError(f"no checkpoint in {folder} verifies ({listed}); resume from another one with "
                        f"checkpoint.resume=<path to a step-N folder>, or start over with checkpoint.resume=never "
                        f"checkpoint.overwrite=true (this run's files are then kept in previous-<time>/)")
    return None


def choose_resume(run_dir: str, policy) -> str | None:
    """The checkpoint a run in `run_dir` continues from, per checkpoint.resume; None to start fresh. Main process,
    with the run folder locked. Deletes nothing: a fresh start's caller moves earlier outputs aside."""
    folder = os.path.join(run_dir, CHECKPOINTS)
    resume = policy.resume
    if resume == "never":
        if list_checkpoints(folder) and not policy.overwrite:
            raise UserError(f"{folder} already holds checkpoints and checkpoint.resume=never; use "
                            f"checkpoint.resume=auto to continue, checkpoint.overwrite=true to start over (the old "
                            f"files are kept in previous-<time>/), or another output_dir")
        return None
    if resume == "auto":
        found = newest_valid(folder)
        log.debug(f"checkpoint.resume=auto: {f'resuming from {found}' if found else f'no checkpoint in {folder}'}")
        return found
    path = os.path.abspath(resume)
    if os.path.isdir(os.path.join(path, CHECKPOINTS)):      # a run folder: its newest valid checkpoint
        found = newest_valid(os.path.join(path, CHECKPOINTS))
        if found is None:
            raise UserError(f"no checkpoint in {path}/checkpoints; pass a step-<N> folder or "
                            f"checkpoint.resume=never")
        return found
    if not os.path.isdir(path) or not STEP_DIR.match(os.path.basename(path)):
        raise UserError(f"checkpoint.resume={resume} is not a checkpoint folder (step-<N>) or a run folder; "
                        f"use auto, never or an existing path")
    problem = verify(path)
    if problem:
        raise UserError(f"checkpoint {path} is unusable ({problem}); pick another step-<N> folder")
    return path


class Checkpoints:
    """The checkpoints of one run: what to save is given once (the raw model, the plain optimizer, the scheduler,
    the grad scaler), when to save is decided here (should_save), and save/load are called on every rank alike."""

    def __init__(self, run_dir: str, cfg: Config, accelerator, *, model, optimizer, scheduler,
                 total_steps: int, epochs: int, ema=None):
        self.folder = os.path.join(run_dir, CHECKPOINTS)
        self.cfg, self.policy = cfg, cfg.checkpoint
        self.accelerator = accelerator
        self.is_main = accelerator.is_main_process
        self.model, self.optimizer, self.scheduler, self.scaler = model, optimizer, scheduler, accelerator.scaler
        self.ema = ema          # cifar.ema.Ema or None
        self.total_steps, self.epochs = total_steps, epochs

    # -- when

    def should_save(self, step: int, *, epoch_end: int | None = None, last_window: bool = False,
                    stopping: bool = False) -> bool:
        """After optimizer step `step` (epoch_end None) or after epoch `epoch_end`'s evaluation: is a save due?
        A checkpoint.every_steps save falling on an epoch's last step waits for the epoch's end, so that the
        checkpoint holds the evaluated epoch and is not saved twice; a stop saves at once."""
        every = self.policy.every_steps
        step_due = bool(every and step % every == 0 and step < self.total_steps)
        if epoch_end is None:
            return stopping or (step_due and not last_window)
        every = self.policy.every_epochs
        return step_due or epoch_end == self.epochs - 1 or bool(every and (epoch_end + 1) % every == 0)

    # -- saving

    def save(self, state: TrainState, acc: float | None = None) -> str | None:
        """Every rank calls this: their RNG states are gathered, the main process writes step-<state.step>
        atomically, updates the pointers and prunes, and no rank returns before it has. acc: the test accuracy
        measured at this very step, which keep_best ranks by (None mid-epoch). The path, on the main process."""
        rngs = gather_object([rng_state()]) if self.accelerator.num_processes > 1 else [rng_state()]
        return on_main(self.accelerator, lambda: self._write(state, rngs, acc))    # a failed save fails every rank

    def _write(self, state: TrainState, rng_states: list, acc: float | None) -> str:
        """The save, or SaveFailed (a full disk, an I/O error) with its partial files removed: the previous
        checkpoints and the pointers are left as they were."""
        name = f"step-{state.step}"
        tmp = os.path.join(self.folder, f".tmp-{name}-{os.getpid()}")
        try:
            return self._write_files(state, rng_states, acc, name, tmp)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            latest = read_pointer(self.folder, LATEST)
            kept = f"the previous checkpoint {latest} is intact" if latest else "no earlier checkpoint was saved"
            raise SaveFailed(f"could not save checkpoint {name} in {self.folder} ({e.strerror or e}: "
                             f"{e.filename or self.folder}); {kept}; {write_advice(e.errno)}") from None

    def _write_files(self, state: TrainState, rng_states: list, acc: float | None, name: str, tmp: str) -> str:
        os.makedirs(self.folder, exist_ok=True)
        final = os.path.join(self.folder, name)
        if os.path.isdir(final) and verify(final) is None:
            return final                                  # already saved at this step (e.g. epoch end + signal)
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        # serialised in memory, written with plain writes: a full disk is an OSError naming the file (torch.save's
        # and safetensors' own writers raise their own, unnamed errors)
        training = io.BytesIO()
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "scaler": self.scaler.state_dict() if self.scaler is not None else None,
                    "rng": [_as_tensors(r) for r in rng_states],
                    "ema_updates": self.ema.updates if self.ema else None}, training)
        contents = {WEIGHTS: weights_bytes(self.model), "training.pt": training.getvalue(),
                    "state.json": json.dumps({"state": asdict(state), "test_acc": acc, "config": self.cfg.to_dict()},
                                             indent=1).encode(),
                    CONFIG: self.cfg.to_yaml().encode()}
        if self.ema:
            contents[EMA_WEIGHTS] = weights_bytes(self.ema.module)
        files = {}
        for file, data in contents.items():
            write_durable(os.path.join(tmp, file), data)
            files[file] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            if file == "training.pt":
                _fault_point("kill-during-save", state.step)
        write_durable(os.path.join(tmp, MANIFEST), json.dumps({"step": state.step, "files": files}, indent=1).encode())
        fsync_dir(tmp)
        if os.path.isdir(final):                          # an invalid leftover with the same name
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.folder)
        _write_pointer(self.folder, LATEST, name)
        self._prune()
        log.debug(f"saved checkpoint {final} ({sum(f['size'] for f in files.values()) / 1e6:.1f} MB, verified "
                  f"by SHA-256 on resume); kept: {', '.join(os.path.basename(p) for p in list_checkpoints(self.folder))}")
        _fault_point("kill-after-save", state.step)
        pause_point("pause-after-save", state.step)
        return final

    def _prune(self) -> None:
        """Keep the newest keep_last and the best keep_best (by test accuracy); remove the rest and stale temps."""
        done = list_checkpoints(self.folder)
        keep = set(done[: self.policy.keep_last])
        scored = [(acc, step_of(p), p) for p in done if (acc := _saved_acc(p)) is not None]
        best = [p for _, _, p in sorted(scored, reverse=True)[: self.policy.keep_best]]
        keep.update(best)
        if best:
            _write_pointer(self.folder, BEST, os.path.basename(best[0]))
        for path in done:
            if path not in keep:
                shutil.rmtree(path, ignore_errors=True)
        for name in os.listdir(self.folder):
            if name.startswith(".tmp-step-") and not name.endswith(f"-{os.getpid()}"):
                shutil.rmtree(os.path.join(self.folder, name), ignore_errors=True)

    # -- loading

    def load(self, path: str) -> TrainState:
        """Restore the model, optimizer, scheduler, grad scaler and this rank's RNGs from `path` (every rank). The
        checkpoint was vetted against the config before (cifar/resume.py): what differs is applied, not refused
        here. The optimizer's lr and weight decay follow the config, at the schedule's restored position."""
        saved = read_state(path)
        load_weights(self.model, os.path.join(path, WEIGHTS), "resume with the config it was saved with")
        training = read_training(path)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        try:
            self.optimizer.load_state_dict(training["optimizer"])
        except ValueError as e:      # another number or size of parameter groups
            raise UserError(f"checkpoint {path} has optimizer state for other parameter groups ({e}); resume with "
                            f"the optim and model settings it was saved with") from None
        self.scheduler.load_state_dict(training["scheduler"])
        follow_config(self.optimizer, self.scheduler, configured)
        if self.scaler is not None and training["scaler"] is not None:
            self.scaler.load_state_dict(training["scaler"])
        if self.ema:
            self._load_ema(path, training.get("ema_updates"))
        # one state per rank that saved; on another number of processes rank r takes saved rank r mod their number's
        if training["rng"]:
            set_rng_state(training["rng"][rng_source(self.accelerator.process_index, len(training["rng"]))])
        return TrainState(**saved["state"])

    def _load_ema(self, path: str, updates: int | None) -> None:
        file = os.path.join(path, EMA_WEIGHTS)
        if not os.path.isfile(file) or updates is None:
            warn(f"checkpoint {path} holds no moving average of the weights (it was saved without train.ema): the "
                 f"average starts from the resumed weights")
            return
        self.ema.restore(load_file(file), updates)


def follow_config(optimizer, scheduler, configured: list[dict]) -> None:
    """Put the config's base lr and weight decay of each parameter group (`configured`: the groups as built from
    the config, before the checkpoint's replaced them) back over the restored ones, and set each group's lr to its
    schedule's value at the restored position. With the config a checkpoint was saved with this changes nothing
    (the same product the scheduler computed); with a changed optim.lr or schedule length, the real lr follows the
    new one from here on, rather than the restored base lr."""
    for group, wanted in zip(optimizer.param_groups, configured):
        group["initial_lr"], group["weight_decay"] = wanted["initial_lr"], wanted["weight_decay"]
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


# ----------------------------------------------------------------------------- reading a checkpoint's files

# What a state.json cannot do without: where the loop stands. Fields added later default when absent.
_REQUIRED = ("epoch", "samples_in_epoch", "step", "global_batch")
_FRESH = "start over with checkpoint.resume=never checkpoint.overwrite=true (or another output_dir)"
_START_OVER = f"resume from another checkpoint with checkpoint.resume=<path to a step-N folder>, or {_FRESH}"


def read_state(path: str) -> dict:
    """A checkpoint's state.json ({"state", "test_acc", "config"}), refused in one line when it is not JSON, lacks
    what the loop needs, or has state this version does not know (written by a newer one)."""
    file = os.path.join(path, "state.json")
    try:
        with open(file, "rb") as f:
            saved = json.loads(f.read())
    except FileNotFoundError:
        raise UserError(f"checkpoint {path} has no state.json; {_START_OVER}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{file} is not valid JSON ({e}); {_START_OVER}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("state"), dict) or not isinstance(
            saved.get("config"), dict):
        raise UserError(f"{file} lacks its 'state' or 'config' section; {_START_OVER}")
    missing = [k for k in _REQUIRED if not isinstance(saved["state"].get(k), int)]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)} (or they are not integers); {_START_OVER}")
    unknown = sorted(saved["state"].keys() - {f.name for f in fields(TrainState)})
    if unknown:
        raise UserError(f"{file} holds state this version does not know ({', '.join(unknown)}): it was written by a "
                        f"newer version of this code; resume it with that version, or {_FRESH}")
    return saved


def read_training(path: str) -> dict:
    """A checkpoint's training.pt, loaded with weights_only=True only: a file that would need arbitrary unpickling
    (which runs code the file chooses) is refused in one line, never loaded, and torch's advice to load it with
    weights_only=False never reaches the user."""
    file = os.path.join(path, "training.pt")
    try:
        training = load_tensors_only(file)
    except pickle.UnpicklingError as e:
        needed = refused_global(e)
        holds = f" (it holds a {needed})" if needed else ""
        raise UserError(f"{file} is refused: loading it would need arbitrary unpickling{holds}, which could run code "
                        f"from the file; it was not written by this version of train.py; {_START_OVER}") from None
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{file} cannot be read ({type(e).__name__}); {_START_OVER}") from None
    if not isinstance(training, dict):
        raise UserError(f"{file} holds a {type(training).__name__}, not the training state; {_START_OVER}")
    missing = [k for k in ("optimizer", "scheduler", "scaler", "rng") if k not in training]
    if missing:
        raise UserError(f"{file} lacks {', '.join(missing)}; {_START_OVER}")
    return training


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


def pause_point(name: str, step: int) -> None:
    """For the signal and disk tests: CIFAR_FAULT=<name>:<step> holds this process here, as a slow save or a long
    step would, until SIGUSR2 arrives; other signals reach their handlers meanwhile (a second Ctrl-C ends it)."""
    if os.environ.get("CIFAR_FAULT") != f"{name}:{step}":
        return
    go_on = []
    previous = signal.signal(signal.SIGUSR2, lambda *_: go_on.append(True))
    print(f"fault: {name} at step {step}: paused until SIGUSR2", file=sys.stderr, flush=True)
    while not go_on:
        time.sleep(0.01)        # signal.pause() could miss a signal arriving just before it
    signal.signal(signal.SIGUSR2, previous)
