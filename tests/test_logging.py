"""Messages go through `logging` (cifar/log.py): --log-level / CIFAR_LOG_LEVEL choose how much, warnings stay one
`warning: ...` line, main process only unless CIFAR_LOG_ALL_RANKS=1, errors one line whatever the level."""
from __future__ import annotations

import contextlib
import io
import logging

import pytest

from cifar import log
from cifar.config import load_config
from cifar.engine import train
from conftest import read_json, run
from inprocess import as_a_process, call, refusal

TINY = ["--config", "configs/debug.yaml", "data.limit_train=128", "data.limit_test=64", "train.epochs=1"]
BOGUS = "warning: W&B is off: WANDB_MODE='bogus' is not one of online, offline, disabled"


@contextlib.contextmanager
def as_a_cli():
    """log.py's own handlers, as a CLI process has them. Under pytest the root logger holds pytest's handlers, so
    log.setup would leave the records to them (a program that configured logging); without them it installs its
    stdout/stderr lines, which capfd reads as a shell would. Removed afterwards, pytest's put back."""
    root = logging.getLogger()
    theirs = root.handlers[:]
    for handler in theirs:
        root.removeHandler(handler)
    try:
        yield
    finally:
        for handler in log._installed:
            log.LOGGER.removeHandler(handler)
        log._installed.clear()
        log.LOGGER.propagate = True
        for handler in theirs:
            root.addHandler(handler)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_warning_level_keeps_warnings_and_nothing_else(tmp_path, capfd, how):
    out = tmp_path / "run"
    args, extra = (["--log-level", "warning"], {}) if how == "flag" else ([], {"CIFAR_LOG_LEVEL": "warning"})
    with as_a_cli():
        call("train.py", *TINY, f"output_dir={out}", *args, WANDB_MODE="bogus", **extra)
    stdout, stderr = capfd.readouterr()
    assert stdout == ""                                              # no config, no progress, no epoch rows
    assert stderr.splitlines() == [BOGUS]
    assert read_json(out / "summary.json")["steps"] == 4               # and the run itself is the same: all its steps
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_the_level_from_the_environment_holds_for_the_whole_process(tmp_path):
    """The real process: with CIFAR_LOG_LEVEL=warning nothing else reaches its stdout and stderr, not from an
    import, a library's logger or Python's warnings (which pytest catches in-process)."""
    proc = run("train.py", *TINY, f"output_dir={tmp_path / 'run'}", WANDB_MODE="bogus", CIFAR_LOG_LEVEL="warning")
    assert proc.stdout == "" and proc.stderr.splitlines() == [BOGUS]
    assert read_json(tmp_path / "run" / "summary.json")["steps"] == 4


def test_error_level_hides_warnings_and_debug_shows_saves(tmp_path, capfd):
    with as_a_cli():
        call("train.py", *TINY, f"output_dir={tmp_path / 'a'}", "--log-level", "error", WANDB_MODE="bogus")
        quiet = capfd.readouterr()
        call("train.py", *TINY, f"output_dir={tmp_path / 'b'}", CIFAR_LOG_LEVEL="debug")
        loud = capfd.readouterr()
    assert quiet.out == "" and quiet.err == ""
    assert read_json(tmp_path / "a" / "summary.json")["steps"] == 4
    lines = loud.out.splitlines()
    assert f"debug: locked {tmp_path / 'b' / '.lock'} (held until this process exits)" in lines
    assert any(line.startswith(f"debug: saved checkpoint {tmp_path / 'b'}/checkpoints/step-4") for line in lines)
    assert any(line.startswith("epoch 0  step=4") for line in lines)   # info stays whole plain lines


def test_a_bad_level_is_one_line_exit_2(capsys):
    line = refusal(capsys, "train.py", "--print-config", CIFAR_LOG_LEVEL="loud")
    assert line == ("error: log level 'loud' is not one of debug, info, warning, error; set --log-level or "
                    "CIFAR_LOG_LEVEL to one of them")
    with pytest.raises(SystemExit) as exit_:
        call("train.py", "--log-level", "loud")
    out, err = capsys.readouterr()
    assert exit_.value.code == 2 and "invalid choice: 'loud'" in err and out == "", err


def test_a_program_with_its_own_logging_gets_the_records(tmp_path):
    """Used from a program that configured logging, the records go to its handlers, formatted its way."""
    mine = logging.StreamHandler(io.StringIO())
    mine.setFormatter(logging.Formatter("MINE %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    with as_a_cli(), as_a_process():
        root.addHandler(mine)                      # the program's logging.basicConfig(...)
        try:
            log.setup()
            train(load_config("configs/debug.yaml", TINY[2:] + [f"output_dir={tmp_path / 'r'}"]))
        finally:
            root.removeHandler(mine)
        assert log._installed == []                # log.py added no handler of its own
    records = mine.stream.getvalue()
    assert "MINE cifar INFO epoch 0  step=4" in records and "MINE cifar INFO summary " in records


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
