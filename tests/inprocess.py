"""The entry points (train.py, evaluate.py, predict.py) called in this process, as the fast tier calls them: their
cli-wrapped main(argv), without the ~3 s of a fresh interpreter importing torch. Where the claim is about a message
(exit code, one `error:` line), the process adds nothing a real one would catch: errors.cli prints that line."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal

import pytest
import torch
from conftest import ROOT

from cifar import errors, log
from cifar.signals import StopRequest

_mains: dict = {}


def entry(script: str):
    """The main(argv) of a script beside the package (train.py, evaluate.py, predict.py), imported once."""
    if script not in _mains:
        spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        _mains[script] = module.main
    return _mains[script]


@contextlib.contextmanager
def one_thread():
    """Torch on one intra-op thread, as a subprocess runs it (conftest.env: OMP_NUM_THREADS=1): two xdist workers
    each running torch's default of one thread per core, on two busy cores, made a small in-process training 6x
    slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def as_a_process(**environ):
    """Around an in-process call: the environment a subprocess of conftest.run gets (W&B off, unless `environ`
    says otherwise) plus `environ`; and afterwards the test process as it was. train.main installs its stop handlers
    and leaves them when start-up fails, says how to resume its run in every later write advice, and sets the log
    level: put pytest's handlers back, forget the stale StopRequest (signals.interruptible consults it), the resume
    advice and the level. Torch runs one thread meanwhile, as in that subprocess (one_thread)."""
    environ = {"WANDB_MODE": "disabled", **environ}
    saved_environ = {name: os.environ.get(name) for name in environ}
    saved_handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    level = log.LOGGER.level
    os.environ.update(environ)
    try:
        with one_thread():
            yield
    finally:
        for name, value in saved_environ.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        for s, handler in saved_handlers.items():
            signal.signal(s, handler)
        StopRequest.active = None
        errors.set_resume(None)
        log.LOGGER.setLevel(level)


def call(script: str, *argv, **environ):
    """Run an entry point in-process to its end, with `environ` set; what it returns (predict.py: its status)."""
    with as_a_process(**environ):
        return entry(script)([str(a) for a in argv])


def status(main, *argv) -> int:
    """main(argv) in this process, as a process's exit status: 0 when it returns, its code when it exits."""
    try:
        main([str(a) for a in argv])
        return 0
    except SystemExit as e:
        return e.code


def train_here(*args: str) -> None:
    """train.py in this process, to its end: the fast tier's training (a refusal is a SystemExit, its line on
    stderr, as from the command line)."""
    call("train.py", *args)


def refusal(capsys, script: str, *argv, code: int = 2, **environ) -> str:
    """Run an entry point in-process (with `environ` set): it must exit `code` with exactly one line on stderr,
    `error: ...`, and print nothing on stdout. Returns that line."""
    capsys.readouterr()                                  # what came before is not this call's
    with pytest.raises(SystemExit) as exit_, as_a_process(**environ):
        entry(script)([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert exit_.value.code == code and len(lines) == 1 and err.endswith("\n"), (exit_.value.code, err[-3000:])
    assert lines[0].startswith("error: ") and "Traceback" not in err and out == "", (err[-3000:], out[-3000:])
    return lines[0]
