"""The run folder's edges: one writer at a time, refused work that changes nothing, a fresh start that keeps the earlier
outputs, folders that cannot be written, and a disk that fills up during a checkpoint save.

Every test runs the real train.py; the disk is a real full tmpfs (mounted by the test as root) or, where mounting is
not permitted, a real file-size limit (RLIMIT_FSIZE).
"""
from __future__ import annotations

import glob
import hashlib
import os
import resource
import signal
import subprocess
import sys
import time

import pytest
import torch

from cifar.checkpoint import read_pointer, verify
from cifar.errors import EXIT_IO
from conftest import ROOT, command, env, read_json, run, weights

# 16 steps of 32 images per epoch; a checkpoint at every 8th step
ARGS = ["--config", "configs/debug.yaml", "data.limit_train=512", "data.limit_test=128", "train.epochs=2",
        "checkpoint.every_steps=8"]


def hashes(folder) -> dict:
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "**"), recursive=True) + glob.glob(f"{folder}/.*")):
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def one_error_line(proc, code: int = 2) -> str:
    """The process exited `code` with a single `error:` line and no traceback; that line."""
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def hold_lock(folder, **extra_env) -> subprocess.Popen:
    """A process that holds the run folder's lock as a training run does, until it is killed."""
    code = ("import sys, time; from cifar.lock import RunLock; lock = RunLock(sys.argv[1]); lock.acquire(); "
            "lock.record(); print('held', flush=True); time.sleep(600)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], cwd=ROOT, env=env(**extra_env),
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


# ----------------------------------------------------------------------------- one writer per folder

@pytest.mark.slow
def test_second_run_on_a_folder_in_use_is_refused_and_the_first_is_untouched(tmp_path):
    """Two train.py on one folder: the second exits 2 before any work, naming the first (pid, host); the first ends
    with exactly the weights of a run that was alone."""
    alone, shared = tmp_path / "alone", tmp_path / "shared"
    first = subprocess.Popen(command("train.py", [*ARGS, f"output_dir={shared}"]), cwd=ROOT, env=env(),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while f'"pid": {first.pid}' not in _read(shared / ".lock"):      # the first holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[0][-3000:]
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGSTOP)      # keeps it mid-run however long the second takes to start
        try:
            before = hashes(shared)
            second = run("train.py", *ARGS, f"output_dir={shared}", check=False)
            assert hashes(shared) == before, "the refused run wrote into the folder"
        finally:
            os.kill(first.pid, signal.SIGCONT)
        line = one_error_line(second)
        assert f"{shared} is in use by train.py pid {first.pid} on {os.uname().nodename}" in line, line
        log, _ = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, log[-3000:]
    run("train.py", *ARGS, f"output_dir={alone}")
    a, b = weights(alone), weights(shared)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_holder_leaves_no_stale_lock_and_readers_never_lock(tmp_path):
    """A holder killed with -9 leaves nothing to clean by hand: the next run starts at once. evaluate.py only reads:
    it runs on a folder whose lock is held."""
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    refused = run("train.py", "--config", "configs/debug.yaml", f"output_dir={folder}", check=False)
    assert f"in use by train.py pid {holder.pid}" in one_error_line(refused)
    holder.kill()
    holder.wait()
    run("train.py", "--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32",
        "train.epochs=1", f"output_dir={folder}")
    assert read_json(folder / "status.json")["state"] == "finished"
    holder = hold_lock(folder)
    try:
        run("evaluate.py", "--checkpoint", str(folder), "--output", str(tmp_path / "eval"))
    finally:
        holder.kill()
        holder.wait()
    assert read_json(tmp_path / "eval" / "eval.json")["accuracy"] >= 0


def test_requeued_slurm_job_waits_for_its_previous_instance(tmp_path):
    """The same SLURM job id as the holder (a requeued job whose previous instance is still shutting down): wait for
    it, say so, then run. Another job id is refused at once."""
    folder = tmp_path / "run"
    holder = hold_lock(folder, SLURM_JOB_ID="4242")
    try:
        other = run("train.py", "--config", "configs/debug.yaml", f"output_dir={folder}", check=False,
                    SLURM_JOB_ID="4343")
        assert "SLURM job 4242" in one_error_line(other)
        requeued = subprocess.Popen(
            command("train.py", ["--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32",
                                 "train.epochs=1", f"output_dir={folder}"]),
            cwd=ROOT, env=env(SLURM_JOB_ID="4242"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(8)                      # it starts, finds the folder held by its own job, and waits
        assert requeued.poll() is None, requeued.communicate()
    finally:
        holder.kill()
        holder.wait()
    out, err = requeued.communicate(timeout=120)
    assert requeued.returncode == 0, err[-3000:]
    assert "waiting for the previous instance of SLURM job 4242" in err and "released the folder after" in err, err
    assert read_json(folder / "status.json")["state"] == "finished"


# ----------------------------------------------------------------------------- never destroy history

@pytest.mark.slow
def test_all_checkpoints_corrupt_refuses_and_changes_nothing_then_overwrite_keeps_history(tmp_path):
    """resume=auto with checkpoints that all fail verification: exit 2, one line listing each and why and naming
    the choices, every file unchanged. The named way out (resume=never overwrite=true) starts over and moves the
    earlier files, byte for byte, into previous-<time>/."""
    folder = tmp_path / "run"
    run("train.py", *ARGS, "train.max_steps=16", f"output_dir={folder}")
    assert sorted(os.listdir(folder / "checkpoints")) == ["best", "latest", "step-16", "step-8"]
    with open(folder / "checkpoints" / "step-8" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with open(folder / "checkpoints" / "step-16" / "training.pt", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    before = hashes(folder)

    proc = run("train.py", *ARGS, "train.max_steps=24", f"output_dir={folder}", check=False)
    line = one_error_line(proc)
    assert "step-16: training.pt corrupted" in line and "step-8: model.safetensors truncated" in line, line
    assert "checkpoint.resume=never checkpoint.overwrite=true" in line and "checkpoint.resume=<path" in line
    assert hashes(folder) == before, "a refused resume changed the run folder"

    run("train.py", *ARGS, "train.max_steps=8", "checkpoint.resume=never", "checkpoint.overwrite=true",
        f"output_dir={folder}")
    previous = glob.glob(str(folder / "previous-*"))
    assert len(previous) == 1
    kept = hashes(previous[0])
    assert kept == {k: v for k, v in before.items() if k != ".lock"}, "earlier outputs were not kept as they were"
    assert read_json(folder / "summary.json")["steps"] == 8


def test_fresh_start_keeps_an_earlier_runs_outputs(tmp_path):
    """A run killed while saving its first checkpoint leaves metrics, status and config but nothing to resume; the
    rerun starts fresh and first moves those files, byte for byte, into previous-<time>/ (nothing truncated)."""
    folder = tmp_path / "run"
    args = ["--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32", "train.epochs=1",
            f"output_dir={folder}"]
    killed = run("train.py", *args, check=False, CIFAR_FAULT="kill-during-save:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = {k: v for k, v in hashes(folder).items() if k != ".lock" and not k.startswith("checkpoints/.tmp")}
    assert {"metrics.jsonl", "status.json", "config.yaml"} <= before.keys()
    proc = run("train.py", *args)
    assert "held an earlier run's outputs" in proc.stderr
    (previous,) = glob.glob(str(folder / "previous-*"))
    assert {k: v for k, v in hashes(previous).items() if not k.startswith("checkpoints/.tmp")} == before
    assert read_json(folder / "status.json")["state"] == "finished"


# ----------------------------------------------------------------------------- folders that cannot be written

def test_unwritable_output_dir_is_one_line(tmp_path):
    cases = ["/proc/cifar-run", "/etc/hostname/run"]      # a file system that refuses, a file in the path
    readonly = tmp_path / "readonly"
    if os.geteuid() == 0:                                # root ignores permissions, not a read-only mount
        readonly.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(readonly)]).returncode == 0:
            cases.append(str(readonly / "run"))
    else:
        readonly.mkdir(mode=0o500)
        cases.append(str(readonly / "run"))
    try:
        for output_dir in cases:
            proc = run("train.py", "--config", "configs/debug.yaml", f"output_dir={output_dir}", check=False)
            line = one_error_line(proc)
            assert f"cannot write the run folder {output_dir}" in line and "output_dir=" in line, line
    finally:
        if os.path.ismount(readonly):
            subprocess.run(["umount", str(readonly)])
    assert len(cases) == 3


# ----------------------------------------------------------------------------- a full disk during a save

class Tmpfs:
    """A small tmpfs mounted at `path` (root only); fill() leaves `free` bytes, empty() frees them again."""

    def __init__(self, path, size: int):
        self.path = str(path)
        os.makedirs(self.path, exist_ok=True)
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", self.path],
                              capture_output=True, text=True)
        self.ok = proc.returncode == 0
        self.filler = os.path.join(self.path, "filler")

    def fill(self, free: int) -> None:
        st = os.statvfs(self.path)
        with open(self.filler, "wb") as f:
            f.write(b"\0" * (st.f_bavail * st.f_frsize - free))

    def empty(self) -> None:
        os.unlink(self.filler)

    def unmount(self) -> None:
        subprocess.run(["umount", "-l", self.path])


@pytest.mark.slow
def test_full_disk_during_a_save_then_rerun_resumes_bitwise(tmp_path, record_property):
    """Killed right after the step-8 checkpoint; rerun on a disk with 64 KB left (a 32 MB tmpfs filled up when the
    test runs as root, else RLIMIT_FSIZE=64 KB on the rerun): the step-16 save fails with one line, exit 74, the
    partial save removed, step-8 still `latest` and verifying. With space again, the same command resumes from
    step-8 and ends with exactly the weights of an uninterrupted run."""
    reference = tmp_path / "reference"
    run("train.py", *ARGS, f"output_dir={reference}")

    disk = Tmpfs(tmp_path / "disk", 32 << 20) if os.geteuid() == 0 else None
    method = "tmpfs" if disk and disk.ok else "RLIMIT_FSIZE"
    if os.environ.get("CI") == "true" and os.geteuid() == 0:
        assert method == "tmpfs", "CI runs as root: the full-disk test must use a real tmpfs"
    record_property("full_disk_method", method)
    print(f"full disk simulated with {method}")
    folder = (tmp_path / "disk" if method == "tmpfs" else tmp_path) / "run"
    try:
        proc = run("train.py", *ARGS, f"output_dir={folder}", check=False, CIFAR_FAULT="kill-after-save:8")
        assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
        checkpoints = str(folder / "checkpoints")
        if method == "tmpfs":
            disk.fill(free=64 << 10)
            proc = run("train.py", *ARGS, f"output_dir={folder}", check=False)
        else:
            limit = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))  # noqa: E731
            proc = subprocess.run(command("train.py", [*ARGS, f"output_dir={folder}"]), cwd=ROOT, env=env(),
                                  capture_output=True, text=True, timeout=300, preexec_fn=limit)
        line = one_error_line(proc, EXIT_IO)
        assert "could not save checkpoint step-16" in line and f"previous checkpoint {checkpoints}/step-8 is " \
               "intact" in line and "rerun the same command" in line, line
        assert not [n for n in os.listdir(checkpoints) if n.startswith(".tmp")], "the partial save was left"
        assert read_pointer(checkpoints, "latest") == f"{checkpoints}/step-8"
        assert verify(f"{checkpoints}/step-8") is None
        assert read_json(folder / "status.json")["state"] == "failed"

        if method == "tmpfs":
            disk.empty()
        proc = run("train.py", *ARGS, f"output_dir={folder}")
        assert "resuming from" in proc.stdout and "step-8" in proc.stdout
        a, b = weights(reference), weights(folder)
        assert all(torch.equal(a[k], b[k]) for k in a), "the resumed run differs from the uninterrupted one"
    finally:
        if method == "tmpfs":
            disk.unmount()


def _read(path) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
