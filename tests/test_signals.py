"""Ctrl-C on a real train.py: the second one ends the process at once, and the first one's advice resumes when pasted.

The process is held inside a checkpoint save by CIFAR_FAULT=pause-after-save:<step> (cifar/checkpoint.py), which
waits for SIGUSR2 as a slow save would, so that the signals arrive at a known point: no sleeps, only its stderr read
line by line.
"""
from __future__ import annotations

import glob
import os
import shlex
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, command, env, read_json

# 16 steps of 32 images per epoch; a checkpoint at every 8th step
ARGS = ["--config", os.path.join(ROOT, "configs", "debug.yaml"), "data.limit_train=512", "data.limit_test=128",
        "train.epochs=2", "checkpoint.every_steps=8"]


def start(args, cwd=ROOT, **extra) -> subprocess.Popen:
    return subprocess.Popen(command("train.py", args), cwd=cwd, env=env(**extra), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def read_until(proc: subprocess.Popen, text: str) -> list[str]:
    """The stderr lines up to and including the first that contains `text` (fails if the process ends first)."""
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if text in line:
            return lines
    proc.wait()
    raise AssertionError(f"exited {proc.returncode} before printing {text!r}:\n{''.join(lines)[-3000:]}")


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Held in the step-8 save, which would never end by itself: the first SIGINT asks for a stop at the next step
    boundary (which never comes), the second ends the process at once: exit 130, no checkpoint after step 8."""
    proc = start([*ARGS, f"output_dir={tmp_path / 'run'}"], CIFAR_FAULT="pause-after-save:8")
    try:
        read_until(proc, "fault: pause-after-save at step 8")
        proc.send_signal(signal.SIGINT)
        read_until(proc, "SIGINT received: stopping at the next step boundary")
        proc.send_signal(signal.SIGINT)
        rest = proc.communicate(timeout=30)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130 and "interrupted twice: exiting now, without a checkpoint" in rest, rest
    assert glob.glob(str(tmp_path / "run" / "checkpoints" / "step-*")) == [str(tmp_path / "run" / "checkpoints" /
                                                                             "step-8")]


@pytest.mark.slow
def test_ctrl_c_without_output_dir_names_the_command_that_resumes(tmp_path):
    """`python train.py ...` with no output_dir (the README's quick start) picks runs/<name>-<time>; after Ctrl-C its
    advice is that command plus output_dir=<that folder>, which, pasted as it is, resumes the run (the same command
    alone would start a new folder from step 0)."""
    proc = start(ARGS, cwd=tmp_path, CIFAR_FAULT="pause-after-save:8")
    try:
        read_until(proc, "fault: pause-after-save at step 8")
        proc.send_signal(signal.SIGINT)
        read_until(proc, "SIGINT received")
        proc.send_signal(signal.SIGUSR2)                 # the save goes on; the stop comes at the next step
        err = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 75, err[-3000:]
    (folder,) = glob.glob(str(tmp_path / "runs" / "debug-*"))
    (line,) = [line for line in err.splitlines() if line.startswith("stopped: SIGINT")]
    assert "rerun the same command" not in line, line
    pasted = shlex.split(line.split("resume with: ", 1)[1])
    assert pasted[0] == "python" and pasted[-1] == f"output_dir={os.path.relpath(folder, tmp_path)}", line
    resumed = subprocess.run([sys.executable, *pasted[1:]], cwd=tmp_path, env=env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout and "step-9" in resumed.stdout, resumed.stdout[-2000:]
    assert glob.glob(str(tmp_path / "runs" / "*")) == [folder]
    assert read_json(os.path.join(folder, "status.json"))["state"] == "finished"
