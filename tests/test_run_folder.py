"""The run folder's edges: one writer at a time, refused work that changes nothing, a fresh start that keeps the earlier
outputs, folders that cannot be written, and a disk that fills up during a checkpoint save or outside one; its states
as every reader sees them (cifar/run_folder.py), the leftovers of a kill, and advice that fits the failure.

The claims about processes (a live run and a second one, a kill, a process held by a fault point) run the real
train.py; a run refused or waiting for another process's lock, or failing on a full disk, runs train.py's main in
this process, the holder being a real process. The disk is a real full tmpfs (mounted by the test as root) or, where
mounting is not permitted, a real file-size limit (RLIMIT_FSIZE). The states, the cleanup and the advice are read
in-process from folders written by hand, a forked child holding the lock where a live run is needed.
"""
from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from cifar import run_folder
from cifar.checkpoint import read_pointer, verify
from cifar.config import CheckpointConfig
from cifar.errors import EXIT_IO, UserError, resume_command, set_resume, write_advice
from cifar.lock import RunLock
from cifar.outputs import claim_run_dir
from conftest import ROOT, command, env, lock_held_by_child, logged_warnings, read_json, run, weights
from test_checkpoint import train_as_process
from test_resume_changes import train_main

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


@pytest.fixture(scope="module")
def reference(baseline):
    """ARGS's run, never interrupted: what a run shared, stopped or resumed must end with."""
    return baseline(*ARGS)


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
def test_second_run_on_a_folder_in_use_is_refused_and_the_first_is_untouched(tmp_path, capsys, caplog, reference):
    """A train.py holds a folder; a second run on it (here, in this process) exits 2 before any work, naming the
    first (pid, host); the first ends with exactly the weights of a run that was alone."""
    alone, shared = reference, tmp_path / "shared"
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
            second = train_as_process(capsys, caplog, *ARGS, f"output_dir={shared}")
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
    a, b = weights(alone), weights(shared)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_holder_leaves_no_stale_lock_and_readers_never_lock(tmp_path, capsys, caplog):
    """A holder killed with -9 leaves nothing to clean by hand: the next run (here, in this process) starts at once.
    evaluate.py only reads: it runs on a folder whose lock is held, and measures what the run recorded."""
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    refused = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", f"output_dir={folder}")
    assert f"in use by train.py pid {holder.pid}" in one_error_line(refused)
    holder.kill()
    holder.wait()
    train_main(["--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32", "train.epochs=1",
                f"output_dir={folder}"])
    assert read_json(folder / "status.json")["state"] == "finished"
    holder = hold_lock(folder)
    try:
        run("evaluate.py", "--checkpoint", str(folder), "--output", str(tmp_path / "eval"))
    finally:
        holder.kill()
        holder.wait()
    assert read_json(tmp_path / "eval" / "eval.json")["accuracy"] == read_json(folder / "summary.json")[
        "final_test_acc"]


def test_requeued_slurm_job_waits_for_its_previous_instance(tmp_path, capsys, caplog, monkeypatch):
    """The same SLURM job id as the holder (a requeued job whose previous instance is still shutting down): wait for
    it, say so, then run. Another job id is refused at once. The holder is a process; the runs, this one: the holder
    is killed once the run says it waits, so it is still waiting then."""
    folder = tmp_path / "run"
    holder = hold_lock(folder, SLURM_JOB_ID="4242")
    try:
        monkeypatch.setenv("SLURM_JOB_ID", "4343")
        other = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", f"output_dir={folder}")
        assert "SLURM job 4242" in one_error_line(other)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")

        def waiting() -> bool:
            return any("waiting for the previous instance" in r.getMessage() for r in list(caplog.records))

        held_while_waiting = []

        def release_once_waiting():           # the run waits in the main thread, on the lock
            while not waiting() and holder.poll() is None:
                time.sleep(0.05)
            held_while_waiting.append(holder.poll() is None)
            holder.kill()

        watcher = threading.Thread(target=release_once_waiting, daemon=True)
        watcher.start()
        requeued = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", "data.limit_train=64",
                              "data.limit_test=32", "train.epochs=1", f"output_dir={folder}")
        watcher.join()
    finally:
        holder.kill()
        holder.wait()
    err = requeued.stderr
    assert held_while_waiting == [True], err[-3000:]       # it waited for the holder, neither refused nor ran
    assert requeued.returncode == 0, err[-3000:]
    assert "waiting for the previous instance of SLURM job 4242" in err and "released the folder after" in err, err
    assert read_json(folder / "status.json")["state"] == "finished"


# ----------------------------------------------------------------------------- never destroy history

def test_all_checkpoints_corrupt_refuses_and_changes_nothing_then_overwrite_keeps_history(tmp_path, capsys, caplog):
    """resume=auto with checkpoints that all fail verification: exit 2, one line listing each and why and naming
    the choices, every file unchanged. The named way out (resume=never overwrite=true) starts over and moves the
    earlier files, byte for byte, into previous-<time>/."""
    folder = tmp_path / "run"
    train_main([*ARGS, "train.max_steps=16", f"output_dir={folder}"])
    assert sorted(os.listdir(folder / "checkpoints")) == ["best", "latest", "step-16", "step-8"]
    with open(folder / "checkpoints" / "step-8" / "model.safetensors", "r+b") as f:
        f.truncate(100)
    with open(folder / "checkpoints" / "step-16" / "training.pt", "r+b") as f:
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 1]))
    before = hashes(folder)

    proc = train_as_process(capsys, caplog, *ARGS, "train.max_steps=24", f"output_dir={folder}")
    line = one_error_line(proc)
    assert "step-16: training.pt corrupted" in line and "step-8: model.safetensors truncated" in line, line
    assert "checkpoint.resume=never checkpoint.overwrite=true" in line and "checkpoint.resume=<path" in line
    assert hashes(folder) == before, "a refused resume changed the run folder"

    train_main([*ARGS, "train.max_steps=8", "checkpoint.resume=never", "checkpoint.overwrite=true",
                f"output_dir={folder}"])
    previous = glob.glob(str(folder / "previous-*"))
    assert len(previous) == 1
    kept = hashes(previous[0])
    assert kept == {k: v for k, v in before.items() if k != ".lock"}, "earlier outputs were not kept as they were"
    assert read_json(folder / "summary.json")["steps"] == 8


@pytest.mark.slow
def test_fresh_start_keeps_an_earlier_runs_outputs(tmp_path, capsys, caplog):
    """A run killed while saving its first checkpoint leaves metrics, status and config but nothing to resume; the
    rerun starts fresh and first moves those files, byte for byte, into previous-<time>/ (nothing truncated)."""
    folder = tmp_path / "run"
    args = ["--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32", "train.epochs=1",
            f"output_dir={folder}"]
    killed = run("train.py", *args, check=False, CIFAR_FAULT="kill-during-save:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    before = {k: v for k, v in hashes(folder).items() if k != ".lock" and not k.startswith("checkpoints/.tmp")}
    assert {"metrics.jsonl", "status.json", "config.yaml"} <= before.keys()
    proc = train_as_process(capsys, caplog, *args)
    assert proc.returncode == 0, proc.stderr
    assert "held an earlier run's outputs" in proc.stderr
    (previous,) = glob.glob(str(folder / "previous-*"))
    assert {k: v for k, v in hashes(previous).items() if not k.startswith("checkpoints/.tmp")} == before
    assert read_json(folder / "status.json")["state"] == "finished"


# ----------------------------------------------------------------------------- folders that cannot be written

def test_unwritable_output_dir_is_one_line(tmp_path, capsys, caplog):
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
            proc = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", f"output_dir={output_dir}")
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
def test_full_disk_during_a_save_then_rerun_resumes_bitwise(tmp_path, record_property, reference):
    """Killed right after the step-8 checkpoint; rerun on a disk with 64 KB left (a 32 MB tmpfs filled up when the
    test runs as root, else RLIMIT_FSIZE=64 KB on the rerun): the step-16 save fails with one line, exit 74, the
    partial save removed, step-8 still `latest` and verifying. With space again, the same command resumes from
    step-8 and ends with exactly the weights of an uninterrupted run."""
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
        assert read_json(folder / "status.json")["state"] == "save-failed"     # a write failed: exit 74

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


# ----------------------------------------------------------------------------- the state, as every reader sees it

def write_status(folder, **status) -> None:
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "status.json"), "w") as f:
        json.dump(status, f)


def test_each_state_from_a_hand_made_folder(tmp_path):
    """In-process: the one vocabulary (run_folder.STATES) from folders written by hand. 'running' is the lock alone
    (a child holds it), whatever status.json says; a status that says running with no holder is a killed run."""
    assert run_folder.state(str(tmp_path / "absent")) == "new"
    (tmp_path / "empty").mkdir()
    assert run_folder.state(str(tmp_path / "empty")) == "new"
    cases = {"stopped": {"state": "stopped", "signal": "SIGTERM"}, "finished": {"state": "finished"},
             "failed": {"state": "failed", "error": "RuntimeError: boom"},
             "save-failed": {"state": "save-failed", "error": "SaveFailed: could not save"},
             "legacy-save-failed": {"state": "failed", "error": "SaveFailed: could not save checkpoint"},
             "killed": {"state": "running", "step": 20}}
    for name, status in cases.items():
        write_status(tmp_path / name, **status)
        assert run_folder.state(str(tmp_path / name)) == name.removeprefix("legacy-"), name
    (tmp_path / "config-only").mkdir()                       # killed before its first status.json
    (tmp_path / "config-only" / "config.yaml").write_text("name: debug\n")
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "status.json").write_text('{"state": "runn')
    assert run_folder.state(str(tmp_path / "config-only")) == run_folder.state(str(tmp_path / "half")) == "killed"
    for name in ("killed", "finished", "config-only"):      # a holder makes any of them running, and only while held
        with lock_held_by_child(str(tmp_path / name)):
            assert run_folder.state(str(tmp_path / name)) == "running"
        assert run_folder.state(str(tmp_path / name)) != "running"
    assert set(run_folder.STATES) == {"new", "running", "stopped", "finished", "failed", "save-failed", "killed"}


def test_the_state_of_a_read_only_folder_is_read_without_writing(tmp_path):
    """In-process: the lock probe opens .lock read-only and creates nothing, so a run folder on a read-only mount (a
    tmpfs remounted ro as root) still reads as running while a child holds its lock, and as killed after."""
    disk = Tmpfs(tmp_path / "ro", 1 << 20) if os.geteuid() == 0 else None
    if not (disk and disk.ok):
        pytest.skip("mounting a tmpfs needs root")
    folder = str(tmp_path / "ro" / "run")
    try:
        write_status(folder, state="running")
        with lock_held_by_child(folder):
            assert subprocess.run(["mount", "-o", "remount,ro", disk.path]).returncode == 0
            before = sorted(os.listdir(folder))
            assert run_folder.state(folder) == "running"
        assert run_folder.state(folder) == "killed"
        assert sorted(os.listdir(folder)) == before and not os.path.exists(os.path.join(folder, "checkpoints"))
    finally:
        disk.unmount()


def test_leftover_temporary_files_go_at_the_next_claim_and_not_before(tmp_path, caplog):
    """In-process: what a killed writer leaves (write_atomic's .tmp-*, a checkpoint save's .tmp-step-N-pid/) stays
    while another process holds the folder (it may be that writer's work in progress) and is removed by the next
    claim, under the lock, before anything else."""
    folder = tmp_path / "run"
    (folder / "checkpoints" / ".tmp-step-8-4242").mkdir(parents=True)
    (folder / "checkpoints" / ".tmp-step-8-4242" / "training.pt").write_bytes(b"half")
    (folder / ".tmp-abc123").write_bytes(b"half a status")
    (folder / "config.yaml").write_text("name: debug\n")
    leftovers = {".tmp-abc123", "checkpoints/.tmp-step-8-4242"}
    with lock_held_by_child(str(folder)):
        with pytest.raises(UserError, match="is in use by"):
            claim_run_dir(str(folder), CheckpointConfig(), RunLock(str(folder)))
        assert all((folder / path).exists() for path in leftovers)
    lock = RunLock(str(folder))
    try:
        assert claim_run_dir(str(folder), CheckpointConfig(), lock) is None        # nothing to resume: fresh
    finally:
        lock.release()
    everything = [os.path.relpath(os.path.join(d, n), folder) for d, dirs, files in os.walk(folder)
                  for n in dirs + files]
    assert not [p for p in everything if os.path.basename(p).startswith(".tmp-")], everything


def test_a_file_system_refusing_flock_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    """In-process, with fcntl.flock made to raise ENOLCK by monkeypatch: no file system here refuses flock (Lustre
    with noflock, some FUSE mounts do), so this one claim is tested by simulating the refusal. The lock is then
    'taken' with a warning that says not to start a second run, and the run goes on."""
    def refuse(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr("cifar.lock.fcntl.flock", refuse)
    lock = RunLock(str(tmp_path / "run"))
    lock.acquire()
    lock.record()
    lock.release()
    assert "does not support flock (No locks available)" in logged_warnings(caplog)
    assert "do not start one" in logged_warnings(caplog)


# ----------------------------------------------------------------------------- advice that fits

@pytest.mark.parametrize("err, fix", [(errno.EROFS, "mounted read-only: remount it read-write"),
                                      (errno.EACCES, "permission denied: fix the folder's permissions"),
                                      (errno.ENOSPC, "the disk is full: free space"),
                                      (errno.EDQUOT, "quota is used up"),
                                      (errno.EIO, "I/O error: check it")])
def test_write_advice_fits_the_cause(err, fix, monkeypatch):
    """In-process: a training run's advice ends with how to resume; evaluate.py's and export's (no resume set) say
    where else to write, and never to resume."""
    monkeypatch.setattr("cifar.errors._resume", None)
    advice = write_advice(err)
    assert fix in advice and "resume" not in advice and "--output" in advice
    set_resume(resume_command("runs/debug-1", given=False, argv=["train.py"], environ={}))
    advice = write_advice(err)
    assert fix in advice and advice.endswith(", then resume with: python train.py output_dir=runs/debug-1")
    assert ("free space" in advice) == (err in (errno.ENOSPC, errno.EDQUOT)), advice


def test_the_resume_command_names_the_folder_the_run_chose():
    """In-process: with output_dir given, the same command resumes; without it, the command plus output_dir=<the
    folder it chose> (quoted as a shell needs); under a launcher, which adds LOCAL_RANK, the launch command."""
    assert resume_command("runs/x", given=True) == "rerun the same command to resume"
    assert resume_command("runs/debug-20261202-004100", given=False, argv=["train.py", "--config", "my configs/a.yaml",
                                                                          "optim.lr=0.1"], environ={}) == \
        "resume with: python train.py --config 'my configs/a.yaml' optim.lr=0.1 output_dir=runs/debug-20261202-004100"
    launched = resume_command("runs/d-1", given=False, argv=["train.py"], environ={"LOCAL_RANK": "0"})
    assert "accelerate launch" in launched and "output_dir=runs/d-1 added" in launched


# ----------------------------------------------------------------------------- the lock's wait, writes outside a save

def test_a_requeued_job_gives_up_waiting_after_cifar_lock_wait(tmp_path, capsys, caplog, monkeypatch):
    """A second process of the same SLURM job id (a requeued job) waits for the holder, and with CIFAR_LOCK_WAIT=1
    gives up after that second: one line naming the holder and the wait, exit 2, the folder as it was."""
    folder = tmp_path / "run"
    holder = hold_lock(folder, SLURM_JOB_ID="4242")
    try:
        before = hashes(folder)
        monkeypatch.setenv("SLURM_JOB_ID", "4242")
        monkeypatch.setenv("CIFAR_LOCK_WAIT", "1")
        proc = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", f"output_dir={folder}")
        assert hashes(folder) == before
    finally:
        holder.kill()
        holder.wait()
    line = one_error_line(proc)
    assert f"is still held by train.py pid {holder.pid}" in line and "SLURM job 4242" in line, line
    assert "after 1 s; stop that process, then requeue" in line, line
    assert "waiting for the previous instance of SLURM job 4242" in proc.stderr


# one epoch of 32 steps, a checkpoint at its end only, a metrics row at every step (about 150 bytes each)
ROWS = ["--config", "configs/debug.yaml", "data.limit_train=1024", "data.limit_test=64", "train.epochs=2",
        "train.log_every_steps=1"]


@pytest.mark.slow
@pytest.mark.parametrize("what, paused_at, free, file", [("metrics", 32, 0, "metrics.jsonl"),
                                                         ("final weights", 64, 16 << 10, "model.safetensors")])
def test_a_full_disk_outside_a_save_is_exit_74_with_advice_that_fits(tmp_path, what, paused_at, free, file):
    """A real 8 MB tmpfs (root), filled while train.py is held right after a checkpoint save (CIFAR_FAULT=
    pause-after-save:N); then the next write outside a save fails: a metrics row (the disk left full), or the final
    weights (16 KB left: status.json still fits). One line naming the file, exit 74, advice for a full disk with the
    command that resumes; the checkpoint intact; with space again the same command resumes and finishes."""
    disk = Tmpfs(tmp_path / "disk", 8 << 20) if os.geteuid() == 0 else None
    if not (disk and disk.ok):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk" / "run"
    try:
        proc = subprocess.Popen(command("train.py", [*ROWS, f"output_dir={folder}"]), cwd=ROOT, text=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env(CIFAR_FAULT=f"pause-after-save:{paused_at}"))
        try:
            for line in proc.stderr:
                if f"pause-after-save at step {paused_at}" in line:
                    break
            disk.fill(free=free)
            proc.send_signal(signal.SIGUSR2)
            err = proc.communicate(timeout=120)[1]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        proc.stderr = err
        line = one_error_line(proc, EXIT_IO)
        assert f"cannot write {folder / file} (No space left on device)" in line, line
        assert line.endswith("the disk is full: free space, then rerun the same command to resume"), line
        assert "Exception ignored" not in err, err[-2000:]
        checkpoints = str(folder / "checkpoints")
        assert read_pointer(checkpoints, "latest") == f"{checkpoints}/step-{paused_at}"
        assert verify(f"{checkpoints}/step-{paused_at}") is None
        expected = {"final weights": "save-failed", "metrics": "killed"}[what]   # a full disk takes status.json too
        assert run_folder.state(str(folder)) == expected
        disk.empty()
        again = run("train.py", *ROWS, f"output_dir={folder}")
        assert f"step-{paused_at}" in again.stdout and read_json(folder / "status.json")["state"] == "finished"
    finally:
        disk.unmount()


def test_a_disk_that_fills_before_status_json_is_exit_74_naming_it(tmp_path, capsys, caplog):
    """A real tmpfs left with two pages (8 KB): the lock's record and config.yaml take them, and the first status.json
    cannot be written. One line naming status.json, exit 74, the advice for a full disk."""
    disk = Tmpfs(tmp_path / "disk", 1 << 20) if os.geteuid() == 0 else None
    if not (disk and disk.ok):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk" / "run"
    try:
        disk.fill(free=8 << 10)
        proc = train_as_process(capsys, caplog, "--config", "configs/debug.yaml", f"output_dir={folder}")
        line = one_error_line(proc, EXIT_IO)
        assert line == f"error: cannot write {folder / 'status.json'} (No space left on device); the disk is full: " \
                       f"free space, then rerun the same command to resume", line
        assert not (folder / "status.json").exists() and (folder / "config.yaml").exists()
    finally:
        disk.unmount()


@pytest.mark.slow
def test_evaluate_and_export_on_a_read_only_run_folder_say_where_else_to_write(tmp_path):
    """A finished run on a tmpfs remounted read-only: evaluate.py and `python -m cifar.export`, which write beside the
    weights by default, fail with one line (exit 74) naming the folder and the read-only mount, and advise --output,
    never freeing space or resuming (they do not train); with --output elsewhere both work."""
    disk = Tmpfs(tmp_path / "disk", 8 << 20) if os.geteuid() == 0 else None
    if not (disk and disk.ok):
        pytest.skip("mounting a tmpfs needs root")
    folder = tmp_path / "disk" / "run"
    try:
        train_main(["--config", "configs/debug.yaml", "data.limit_train=64", "data.limit_test=32", "train.epochs=1",
                    f"output_dir={folder}"])
        assert subprocess.run(["mount", "-o", "remount,ro", disk.path]).returncode == 0
        for proc in (run("evaluate.py", "--checkpoint", str(folder), check=False),
                     subprocess.run([sys.executable, "-m", "cifar.export", "--checkpoint", str(folder), "--format",
                                     "tutorial"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)):
            line = one_error_line(proc, EXIT_IO)
            assert f"cannot write a file in {folder} (Read-only file system)" in line, line
            assert "mounted read-only: remount it read-write, or write elsewhere (--output)" in line, line
            assert "free space" not in line and "resume" not in line, line
        assert run_folder.state(str(folder)) == "finished"
        run("evaluate.py", "--checkpoint", str(folder), "--output", str(tmp_path / "eval"))
        assert read_json(tmp_path / "eval" / "eval.json")["accuracy"] == read_json(folder / "summary.json")[
            "final_test_acc"]
    finally:
        disk.unmount()
