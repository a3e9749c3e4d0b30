"""The run folder: the names of its files, the state a run is in, and the readers every other module uses.

train.py writes the folder (outputs.py, checkpoint.py), evaluate.py adds its evaluation; trained.py,
compare_runs.py, sweep.py and the SLURM scripts only read it, through the functions here (the scripts through
`python -m cifar.run_folder state RUN_DIR`, which prints the state word).

A run is in one of these states (STATES), and no module has words of its own for them:

    new          nothing written yet (a sweep's run that has not started)
    running      a process holds the folder's lock (.lock)
    stopped      stopped on a signal after saving a checkpoint (exit 75): the same command resumes it
    finished     summary.json and the final weights are written
    failed       an error ended it (status.json holds the error line)
    save-failed  a write to the run folder failed (exit 74: disk full, read-only, I/O error); the checkpoints
                 written before are intact
    killed       status.json says running, or was never written, and no process holds the lock: kill -9, OOM, a
                 lost node; the same command resumes it from its newest checkpoint

"running" is decided by the lock alone, never by status.json (which a kill leaves saying "running"): a reader probes
the lock with a shared, non-blocking flock that it drops at once, on a file it opens read-only and never creates.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import re
import shutil

from .errors import UserError

# ----------------------------------------------------------------------------- the files

CONFIG = "config.yaml"              # the resolved config
METRICS = "metrics.jsonl"           # one row per logged step and per epoch
STATUS = "status.json"              # the state train.py last wrote, with its step (and error)
SUMMARY = "summary.json"            # written once training is over, just before status.json says finished
WEIGHTS = "model.safetensors"       # the final weights (and a checkpoint's)
EMA_WEIGHTS = "model-ema.safetensors"   # train.ema: the moving average, loadable into the model like WEIGHTS
EVAL = "eval.json"                  # evaluate.py's report, with its two figures
CONFUSION_PNG = "confusion.png"
PREDICTIONS_PNG = "predictions.png"
WANDB = "wandb"                     # W&B's own files, when W&B is on
CHECKPOINTS = "checkpoints"         # step-<N>/ folders and the LATEST and BEST pointer files
LATEST, BEST = "latest", "best"
STEP_DIR = re.compile(r"^step-(\d+)$")
LOCK = ".lock"                      # flocked by the training run's main process; names its holder
TMP_PREFIX = ".tmp-"                # write_atomic's temporary files, and checkpoint saves in progress (.tmp-step-N-pid)

# What train.py and evaluate.py write: a fresh start moves these aside into previous-<time>/, never deletes them.
OUTPUTS = (CHECKPOINTS, CONFIG, METRICS, STATUS, SUMMARY, WEIGHTS, EMA_WEIGHTS, EVAL, CONFUSION_PNG,
           PREDICTIONS_PNG, WANDB)
PROFILE = "profile"                 # train.profile's torch.profiler trace (cifar/profiling.py)
OUTPUTS += (PROFILE,)

# ----------------------------------------------------------------------------- the states

NEW, RUNNING, STOPPED, FINISHED, FAILED, SAVE_FAILED, KILLED = (
    "new", "running", "stopped", "finished", "failed", "save-failed", "killed")
STATES = (FINISHED, RUNNING, STOPPED, FAILED, SAVE_FAILED, KILLED, NEW)    # the order compare sorts by
_ENDED = (STOPPED, FINISHED, FAILED, SAVE_FAILED)                          # what status.json can say of an ended run


def state(folder: str) -> str:
    """The run's state (the module's docstring says what each means)."""
    if lock_held(folder):
        return RUNNING
    status = read_status(folder) or {}
    recorded = status.get("state")
    if recorded == FAILED and str(status.get("error", "")).startswith("SaveFailed"):
        return SAVE_FAILED          # written before save-failed was a state of its own
    if recorded in _ENDED:
        return recorded
    started = any(os.path.lexists(os.path.join(folder, name)) for name in (STATUS, CONFIG, CHECKPOINTS))
    return KILLED if started else NEW


def lock_held(folder: str) -> bool:
    """Whether a process holds the folder's lock. The probe is a shared flock, taken without waiting and dropped at
    once: it never blocks the holder, and two readers probing together do not see each other. The lock file is
    opened read-only and never created, so a reader needs no write access (and on NFS, where flock becomes a
    byte-range lock, a shared lock is the one a read-only descriptor may take). False without a lock file, and where
    the file system refuses flock (nothing can be known there)."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)                # drops the probe's lock with the descriptor


def holder(folder: str) -> dict:
    """What the lock's last holder recorded (host, pid, start, SLURM job); {} when unreadable or not yet written."""
    return read_json(os.path.join(folder, LOCK)) or {}


def describe_holder(record: dict) -> str:
    if not record:
        return "another process (it has just started)"
    job = f", SLURM job {record['slurm_job']}" if record.get("slurm_job") else ""
    return f"train.py pid {record.get('pid')} on {record.get('host')} (since {record.get('started')}{job})"


# ----------------------------------------------------------------------------- readers

def read_json(path: str) -> dict | None:
    """A JSON object file; None when absent, unreadable or half-written."""
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_status(folder: str) -> dict | None:
    return read_json(os.path.join(folder, STATUS))


def read_summary(folder: str) -> dict | None:
    return read_json(os.path.join(folder, SUMMARY))


def failure(folder: str) -> str:
    """The error line a failed run left in status.json, if any."""
    return str((read_status(folder) or {}).get("error") or "")


def read_pointer(checkpoints: str, name: str) -> str | None:
    """The checkpoint folder a pointer file (LATEST, BEST) of `checkpoints` names; None when there is none."""
    try:
        with open(os.path.join(checkpoints, name)) as f:
            target = f.read().strip()
    except FileNotFoundError:
        return None
    return os.path.join(checkpoints, target) if STEP_DIR.match(target) else None


def latest_state(folder: str) -> dict | None:
    """Where the loop stood at the newest checkpoint (its state.json's state), None without one."""
    latest = read_pointer(os.path.join(folder, CHECKPOINTS), LATEST)
    found = (read_json(os.path.join(latest, "state.json")) or {}).get("state") if latest else None
    return found if isinstance(found, dict) else None


def find_run_files(path: str, pick: str = "auto") -> tuple[str, str]:
    """(config.yaml, weights) for a checkpoint folder, a weights file, or a run folder. In a run folder, `pick`
    chooses the final weights, the `latest` or the `best` checkpoint; auto means final if the run finished, else
    latest; ema the moving average (train.ema) beside the final weights, else in the latest checkpoint (or in the
    checkpoint folder given)."""
    path = os.path.abspath(path)
    if pick == "ema":
        return _find_ema(path)
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    checkpoints = os.path.join(folder, CHECKPOINTS)
    if os.path.isdir(folder) and not os.path.isfile(path):
        finished = os.path.isfile(os.path.join(folder, WEIGHTS))
        has_latest = read_pointer(checkpoints, LATEST) is not None
        if pick == "final" and not finished and has_latest:
            raise UserError(f"{folder} has no final weights yet (no {WEIGHTS}: the run has not finished); use "
                            f"--pick latest to evaluate its newest checkpoint, or rerun the training command to "
                            f"finish it")
        if pick in ("latest", "best") or (pick == "auto" and not finished):
            target = read_pointer(checkpoints, {"auto": LATEST, "latest": LATEST, "best": BEST}[pick])
            if target is None and pick != "auto":
                others = [p for p, ok in (("latest", has_latest), ("final", finished)) if ok and p != pick]
                hint = f"use --pick {' or '.join(others)}" if others else "it holds no weights to evaluate yet"
                raise UserError(f"{folder} has no '{pick}' checkpoint; {hint}")
            folder = target or folder
    weights, config = os.path.join(folder, WEIGHTS), os.path.join(folder, CONFIG)
    if not os.path.isfile(weights) or not os.path.isfile(config):
        raise UserError(f"no weights at {path} (need {WEIGHTS} and config.yaml); pass a run folder written by "
                        f"train.py (runs/<name>-<time>) or one of its checkpoints/step-<N> folders")
    return config, weights


def _find_ema(path: str) -> tuple[str, str]:
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    if not os.path.isfile(os.path.join(folder, EMA_WEIGHTS)):     # a run folder still training: its newest save
        folder = read_pointer(os.path.join(folder, CHECKPOINTS), LATEST) or folder
    weights, config = os.path.join(folder, EMA_WEIGHTS), os.path.join(folder, CONFIG)
    if not os.path.isfile(weights) or not os.path.isfile(config):
        raise UserError(f"{path} holds no moving average of the weights ({EMA_WEIGHTS}): it was trained without "
                        f"train.ema; evaluate its own weights (--pick auto), or train with train.ema.decay=0.999")
    return config, weights




# What torch.save(net.state_dict(), PATH) files are called: the tutorial's cifar_net.pth, and PyTorch's examples.
STATE_DICT_SUFFIXES = (".pth", ".pt")


def is_state_dict_file(path: str) -> bool:
    return path.lower().endswith(STATE_DICT_SUFFIXES) and not os.path.isdir(path)


# ----------------------------------------------------------------------------- cleanup

def remove_leftovers(folder: str) -> list[str]:
    """Remove the temporary files a killed writer left (write_atomic's .tmp-*, checkpoint saves in progress): call
    only with the folder's lock held, when no writer of this folder can be running. The names removed."""
    removed = []
    for where in (folder, os.path.join(folder, CHECKPOINTS)):
        try:
            names = os.listdir(where)
        except OSError:
            continue
        for name in sorted(n for n in names if n.startswith(TMP_PREFIX)):
            path = os.path.join(where, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.unlink(path)
            removed.append(os.path.relpath(path, folder))
    return removed


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifar.run_folder",
                                     description="Read a run folder as the SLURM scripts do.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("state", help=f"print the run's state: {' | '.join(STATES)}").add_argument("folder")
    args = parser.parse_args(argv)
    print(state(args.folder))


if __name__ == "__main__":
    main()
