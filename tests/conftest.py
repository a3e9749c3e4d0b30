"""Shared fixtures: small CIFAR-10 copies written as the real pickle files, and helpers that run the real CLIs."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cifar.data import CIFAR100_CLASSES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One intra-op thread in the test processes, as run()'s subprocesses have (OMP_NUM_THREADS=1): with -n 2 each worker
# has a core, and torch's default of one thread per core makes every in-process op wait for the other worker's.
torch.set_num_threads(1)
# The debug recipe's 192-step run as the checkpoint, end-to-end and docs tests compare against it: one shared baseline
DEBUG = ("--config", "configs/debug.yaml", "checkpoint.every_steps=8", "train.log_every_steps=4")


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
    # wandb records its backend's address in os.environ (WANDB_SERVICE) when a test uses it in-process; a child given
    # it would use that test's backend (or a dead one) instead of starting its own, as a user's command does
    e.pop("WANDB_SERVICE", None)
    e.update(extra)
    return e


def command(script: str, args, procs: int = 1) -> list[str]:
    """The command line a user would type: python script ..., or accelerate launch (DDP on gloo) for procs > 1."""
    if script == "train.py":
        _refuse_in_the_fast_tier("starts a training process")
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


# --- The suite's budget --------------------------------------------------------------------------------------------
# Every test fits in BUDGET seconds of wall time (setup, including the module fixtures it is the first to need, plus
# its call), or says why not with @pytest.mark.budget(seconds=N, reason="..."). CIFAR_TEST_BUDGET=<seconds> moves
# the default (0 turns the check off, e.g. on a machine busy with other work); CI runs with the default.
BUDGET = float(os.environ.get("CIFAR_TEST_BUDGET", "60"))
_current: dict = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    _current["item"] = item
    yield
    _current.pop("item", None)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if call.when == "setup":
        item.stash[_setup_time] = call.duration
        return
    if call.when != "call" or not report.passed or BUDGET <= 0:
        return
    marker = item.get_closest_marker("budget")
    if marker is not None and not marker.kwargs.get("reason"):
        report.outcome, report.longrepr = "failed", "@pytest.mark.budget needs reason=: say why this test is slow"
        return
    limit = marker.kwargs.get("seconds", BUDGET) if marker is not None else BUDGET
    took = item.stash.get(_setup_time, 0.0) + call.duration
    if took > limit:
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} took {took:.1f} s (setup {item.stash.get(_setup_time, 0.0):.1f} s), over "
                           f"its {limit:.0f} s budget: make it cheaper, or mark it "
                           f"@pytest.mark.budget(seconds=N, reason=...)")


_setup_time = pytest.StashKey[float]()


def _refuse_in_the_fast_tier(what: str) -> None:
    """The fast tier (-m "not slow") is the edit-test loop: no test in it pays for a training process."""
    item = _current.get("item")
    if item is not None and item.get_closest_marker("slow") is None:
        pytest.fail(f"{item.nodeid} {what} but is in the fast tier: call train.main in this process, use a shared "
                    f"baseline from a slow test, or mark it @pytest.mark.slow", pytrace=False)


# --- Shared baselines ----------------------------------------------------------------------------------------------
# A reference run that several tests (in several files) compare against is trained once per session, whichever
# xdist worker needs it first; the others wait on its lock file and reuse the folder. Treat it as read-only: copy it
# (shutil.copytree) before changing anything in it.
def shared_folder(tmp_path_factory) -> Path:
    """The session's folder for what its xdist workers share (each worker has its own basetemp; their parent is the
    session's)."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    shared = base / "baselines"
    shared.mkdir(exist_ok=True)
    return shared


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
    shared = shared_folder(tmp_path_factory)

    def get(*args: str, procs: int = 1, **env_extra: str) -> Path:
        """The run folder of `train.py *args output_dir=<folder>` (procs processes, extra environment), trained once
        per session. "{dir}" in an environment value is a private folder of this baseline's (a HOME, a WANDB_DIR).
        What the run printed is beside the folder: <folder>.stdout and <folder>.stderr."""
        key = hashlib.sha256(json.dumps([procs, args, sorted(env_extra.items())]).encode()).hexdigest()[:16]
        folder, done = shared / key, shared / f"{key}.done"
        with open(shared / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                private = shared / f"{key}.env"
                for path in (folder, private):          # a worker that died mid-run left them: train again
                    shutil.rmtree(path, ignore_errors=True)
                private.mkdir()
                extra = {k: v.replace("{dir}", str(private)) for k, v in env_extra.items()}
                proc = run("train.py", *args, f"output_dir={folder}", procs=procs, **extra)
                Path(f"{folder}.stdout").write_text(proc.stdout)
                Path(f"{folder}.stderr").write_text(proc.stderr)
                done.write_text(json.dumps({"args": list(args), "procs": procs}))
        return folder

    return get


# The 1-process / 2-process double-batch pair that test_equivalence and test_ema both compare, trained once per
# session: 84 images, global batch 12, so 7 steps an epoch evenly split between 2 ranks; a moving average kept
# beside the weights.
DOUBLE_BATCH = ("--config", "configs/tutorial.yaml", "data.source=synthetic", "data.limit_train=84",
                "data.limit_test=37", "data.augment=true", "data.num_workers=0", "optim.lr=0.05", "train.epochs=2",
                "train.log_every_steps=1", "train.ema.decay=0.7")


def double_batch_pair(baseline) -> tuple[Path, Path]:
    """The run folders of DOUBLE_BATCH with batch 12 on 1 process and batch 6 on each of 2, trained at the same
    time by whichever test needs them first (3 processes on CI's 2 cores: less wall time than one after the other)."""
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(baseline, *DOUBLE_BATCH, "data.batch_size=12")
        two = pool.submit(baseline, *DOUBLE_BATCH, "data.batch_size=6", procs=2)
        return one.result(), two.result()


# --- A shared sweep ------------------------------------------------------------------------------------------------
# A real sweep (`python -m cifar.sweep FILE --runs-dir DIR`) that several files read, run once per session like a
# baseline: test_sweep's reruns and resumes compare against it, test_compare's seed groups are made of its runs.
@pytest.fixture(scope="session")
def shared_sweep(tmp_path_factory):
    shared = shared_folder(tmp_path_factory)

    def get(text: str, file: str) -> tuple[str, Path, subprocess.CompletedProcess]:
        """(the sweep file, its --runs-dir, the finished sweep's CompletedProcess) for the sweep file `text`, named
        `file`. Read-only."""
        key = "sweep-" + hashlib.sha256(json.dumps([text, file]).encode()).hexdigest()[:16]
        folder, done = shared / key, shared / f"{key}.done"
        path, runs_dir = folder / file, folder / "runs"
        with open(shared / f"{key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                shutil.rmtree(folder, ignore_errors=True)    # a worker that died mid-sweep left it: run again
                folder.mkdir()
                path.write_text(text)
                proc = subprocess.run([sys.executable, "-m", "cifar.sweep", str(path), "--runs-dir", str(runs_dir)],
                                      capture_output=True, text=True, timeout=600, env=env(), cwd=ROOT,
                                      stdin=subprocess.DEVNULL)
                assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
                done.write_text(json.dumps({"stdout": proc.stdout, "stderr": proc.stderr, "args": proc.args}))
        record = json.loads(done.read_text())
        return str(path), runs_dir, subprocess.CompletedProcess(record["args"], 0, record["stdout"], record["stderr"])

    return get
