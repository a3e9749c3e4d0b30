"""Messages go through `logging` (cifar/log.py): --log-level / CIFAR_LOG_LEVEL choose how much, warnings stay one
`warning: ...` line, main process only unless CIFAR_LOG_ALL_RANKS=1, errors one line whatever the level."""
from __future__ import annotations

import logging
import subprocess
import sys

import pytest

from cifar import log
from conftest import ROOT, env, run

TINY = ["--config", "configs/debug.yaml", "data.limit_train=128", "data.limit_test=64", "train.epochs=1"]


@pytest.mark.parametrize("how", ["flag", "env"])
def test_warning_level_keeps_warnings_and_nothing_else(tmp_path, how):
    out = tmp_path / "run"
    args, extra = (["--log-level", "warning"], {}) if how == "flag" else ([], {"CIFAR_LOG_LEVEL": "warning"})
    proc = run("train.py", *TINY, f"output_dir={out}", *args, WANDB_MODE="bogus", **extra)
    assert proc.stdout == ""                                         # no config, no progress, no epoch rows
    assert proc.stderr.splitlines() == ["warning: W&B is off: WANDB_MODE='bogus' is not one of online, offline, "
                                        "disabled"]
    assert (out / "model.safetensors").is_file()                      # and the run itself is the same


def test_error_level_hides_warnings_and_debug_shows_saves(tmp_path):
    quiet = run("train.py", *TINY, f"output_dir={tmp_path / 'a'}", "--log-level", "error", WANDB_MODE="bogus")
    assert quiet.stdout == "" and quiet.stderr == ""
    loud = run("train.py", *TINY, f"output_dir={tmp_path / 'b'}", CIFAR_LOG_LEVEL="debug")
    lines = loud.stdout.splitlines()
    assert f"debug: locked {tmp_path / 'b' / '.lock'} (held until this process exits)" in lines
    assert any(line.startswith(f"debug: saved checkpoint {tmp_path / 'b'}/checkpoints/step-4") for line in lines)
    assert any(line.startswith("epoch 0  step=4") for line in lines)   # info stays whole plain lines


def test_a_bad_level_is_one_line_exit_2(tmp_path):
    proc = run("train.py", "--print-config", check=False, CIFAR_LOG_LEVEL="loud")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("error: log level 'loud' is not one of debug, info, warning, error; set --log-level or "
                           "CIFAR_LOG_LEVEL to one of them\n")
    proc = run("train.py", "--log-level", "loud", check=False)
    assert proc.returncode == 2 and "invalid choice: 'loud'" in proc.stderr


def test_a_program_with_its_own_logging_gets_the_records(tmp_path):
    """Used from a program that configured logging, the records go to its handlers, formatted its way."""
    code = ("import logging, sys; logging.basicConfig(stream=sys.stdout, format='MINE %(name)s %(levelname)s "
            "%(message)s', level=logging.INFO)\nfrom cifar import log\nlog.setup()\nfrom cifar.config import "
            "load_config\nfrom cifar.engine import train\n"
            f"train(load_config('configs/debug.yaml', {TINY[2:] + ['output_dir=' + str(tmp_path / 'r')]!r}))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env(),
                          cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MINE cifar INFO epoch 0  step=4" in proc.stdout and "MINE cifar INFO summary " in proc.stdout


@pytest.mark.slow
def test_every_rank_warns_but_the_log_shows_the_main_process_unless_asked(tmp_path):
    """Every rank logs what resuming with a changed config applies (train.epochs: the schedule's length, applied from
    the resume step; it was a warning before cifar/resume.py); the log shows it once unless asked for each rank."""
    out = tmp_path / "run"
    run("train.py", *TINY, f"output_dir={out}", procs=2)
    once = run("train.py", *TINY[:-1], "train.epochs=2", f"output_dir={out}", procs=2)
    applied = [line for line in once.stdout.splitlines() if "applied from step" in line]
    assert len(applied) == 1 and applied[0].startswith("resuming at step ") and "train.epochs: 1 -> 2" in applied[0]
    each = run("train.py", *TINY[:-1], "train.epochs=3", f"output_dir={out}", procs=2, CIFAR_LOG_ALL_RANKS="1")
    applied = sorted(line for line in each.stdout.splitlines() if "applied from step" in line)
    assert [w[:len("[rank 0] resuming at step")] for w in applied] == ["[rank 0] resuming at step",
                                                                       "[rank 1] resuming at step"]


def test_records_are_logging_records(caplog):
    with caplog.at_level(logging.DEBUG, logger="cifar"):
        log.warning("disk almost full")
        log.debug("a detail")
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("cifar", "WARNING", "disk almost full"), ("cifar", "DEBUG", "a detail")]
