"""Shared fixtures: small CIFAR-10 copies written as the real pickle files, and helpers that run the real CLIs."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pickle
import socket
import subprocess
import sys

import numpy as np
import pytest
from safetensors.torch import load_file

from cifar.data import CIFAR100_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_cifar(root: str, n_train: int, n_test: int, seed: int = 0) -> str:
    """Random images in the official cifar-10-batches-py layout (5 train batches + test batch + meta)."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder, exist_ok=True)
    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    files = [(f"data_batch_{i + 1}", s) for i, s in enumerate(sizes)] + [("test_batch", n_test)]
    for name, n in files:
        batch = {"batch_label": name, "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "labels": rng.integers(0, 10, n).tolist(), "filenames": [f"{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                     "ship", "truck"]}, f)
    return root


def write_cifar100(root: str, n_train: int, n_test: int, seed: int = 0, classes=None, top: int = 100) -> str:
    """Random images in the official cifar-100-python layout (train, test and meta pickles; fine and coarse labels).
    classes: the meta file's fine_label_names (default: CIFAR-100's); top: fine labels are drawn from 0..top-1."""
    rng = np.random.default_rng(seed)
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder, exist_ok=True)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = rng.integers(0, top, n)
        batch = {"batch_label": f"{name} batch", "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                 "fine_labels": fine.tolist(), "coarse_labels": (fine % 20).tolist(),
                 "filenames": [f"{i}.png" for i in range(n)]}
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump(batch, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": list(classes or CIFAR100_CLASSES),
                     "coarse_label_names": [f"superclass_{i}" for i in range(20)]}, f)
    return root


@pytest.fixture
def cifar_root(tmp_path):
    return write_cifar(str(tmp_path / "data"), n_train=84, n_test=37)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(**extra) -> dict:
    e = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", WANDB_MODE="disabled", PYTHONUNBUFFERED="1")
    e.pop("ACCELERATE_MIXED_PRECISION", None)
    e.update(extra)
    return e


def command(script: str, args, procs: int = 1) -> list[str]:
    """The command line a user would type: python script ..., or accelerate launch (DDP on gloo) for procs > 1."""
    path = os.path.join(ROOT, script)
    if procs == 1:
        return [sys.executable, path, *args]
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(free_port()), path, *args]


def run(script: str, *args, procs: int = 1, check: bool = True, timeout: int = 300, cwd: str = ROOT, **kw):
    """Run train.py / evaluate.py as a user would; with procs > 1 through `accelerate launch` (DDP on gloo)."""
    for attempt in range(3):
        cmd = command(script, args, procs)
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env(**kw), cwd=cwd)
        # another process may take the free port between free_port() and the launcher binding it: pick again
        if procs == 1 or "address already in use" not in proc.stderr.lower():
            break
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n"
                             f"--- stderr\n{proc.stderr[-6000:]}")
    return proc


def weights(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_json(path) -> dict:
    with open(path) as f:
        return json.load(f)


def logged_warnings(caplog) -> str:
    """Warnings an in-process call logged (cifar/log.py), as the `warning: ...` lines a CLI prints: under pytest,
    whose handlers are on the root logger, the records go to caplog instead of stderr."""
    return "".join(f"warning: {r.getMessage()}\n" for r in caplog.records if r.name == "cifar"
                   and r.levelname == "WARNING")


@contextlib.contextmanager
def lock_held_by_child(folder):
    """A forked child holds the run folder's lock (an exclusive flock on <folder>/.lock, opened read-only so that the
    folder may later be remounted read-only) until the block ends: a live training run, as readers see it."""
    ready, done = os.pipe(), os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: lock, say so, wait for the parent's word, exit
        try:
            fd = os.open(os.path.join(folder, ".lock"), os.O_RDONLY | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(ready[1], b"x")
            os.read(done[0], 1)
        finally:
            os._exit(0)
    try:
        assert os.read(ready[0], 1) == b"x"
        yield pid
    finally:
        os.write(done[1], b"x")
        os.waitpid(pid, 0)
        for fd in (*ready, *done):
            os.close(fd)
