"""The entry points (train.py, evaluate.py, predict.py) called in this process, as the fast tier calls them: their
cli-wrapped main(argv), without the ~3 s of a fresh interpreter importing torch. Where the claim is about a message
(exit code, one `error:` line), the process adds nothing a real one would catch: errors.cli prints that line."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal

import pytest
from conftest import ROOT

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
def signal_handlers_kept():
    """train.main installs its stop handlers and leaves them when start-up fails: put the test process's back (and
    forget the stale StopRequest, which signals.interruptible would consult)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)}
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        StopRequest.active = None


def call(script: str, *argv):
    """Run an entry point in-process to its end; what it returns (predict.py: its exit status)."""
    with signal_handlers_kept():
        return entry(script)([str(a) for a in argv])


def refusal(capsys, script: str, *argv, code: int = 2) -> str:
    """Run an entry point in-process: it must exit `code` with exactly one line on stderr, `error: ...`, and
    print nothing on stdout. Returns that line."""
    capsys.readouterr()                                  # what came before is not this call's
    with pytest.raises(SystemExit) as exit_, signal_handlers_kept():
        entry(script)([str(a) for a in argv])
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert exit_.value.code == code and len(lines) == 1 and err.endswith("\n"), (exit_.value.code, err[-3000:])
    assert lines[0].startswith("error: ") and "Traceback" not in err and out == "", (err[-3000:], out[-3000:])
    return lines[0]
