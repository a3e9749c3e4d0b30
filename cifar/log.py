"""Messages through `logging` (the logger "cifar"), so their level and destination are the user's to choose.

    python train.py --log-level warning ...          # or CIFAR_LOG_LEVEL=warning: warnings and errors only
    CIFAR_LOG_LEVEL=debug python train.py ...        # also each checkpoint save, the run-folder lock, resume choices

Levels: debug; info (the default: the config, progress lines, epoch rows, the summary); warning (a problem the run
survives, `warning: ...` on stderr); error. Main process only, as Accelerate's logger does (once its state exists:
before that every process is alone); CIFAR_LOG_ALL_RANKS=1 logs from every rank, each line prefixed `[rank i]`.
Not accelerate.logging's adapter itself: it prefixes every line with `[RANK i]`, which would break the whole-line
formats batch logs and scripts read (`warning: `, `epoch N ...`).

When the program has configured logging itself (handlers on the root logger), records go there; otherwise info
goes to stdout as plain lines and warnings to stderr, one whole line per record. Errors that end the program stay
one `error: ...` line from errors.cli, whatever the level.
"""
from __future__ import annotations

import logging
import os
import sys

LOGGER = logging.getLogger("cifar")
LOGGER.setLevel(logging.INFO)   # used as a library: info records reach the program's own handlers, if it has any
LEVELS = ("debug", "info", "warning", "error")
_installed: list[logging.Handler] = []


class _Std(logging.StreamHandler):
    """A handler on sys.stdout or sys.stderr as they are at each record (tests and notebooks swap them)."""

    def __init__(self, name: str):
        logging.Handler.__init__(self)
        self.name_ = name

    @property
    def stream(self):
        return getattr(sys, self.name_)

    @stream.setter
    def stream(self, value):  # StreamHandler assigns it; the property decides
        pass


class _Format(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prefix = "" if record.levelno == logging.INFO else f"{record.levelname.lower()}: "
        rank = getattr(record, "rank", None)
        return (f"[rank {rank}] " if rank is not None else "") + prefix + record.getMessage()


def level_from(value: str | None) -> int:
    """The level named by `value`, else $CIFAR_LOG_LEVEL, else info; ValueError naming the choices."""
    value = (value or os.environ.get("CIFAR_LOG_LEVEL") or "info").strip().lower()
    if value not in LEVELS:   # the value cut as errors.shorten cuts one (errors imports this module)
        raise ValueError(f"log level {value[:40]!r}{'...' if len(value) > 40 else ''} is not one of "
                         f"{', '.join(LEVELS)}; set --log-level or CIFAR_LOG_LEVEL to one of them")
    return getattr(logging, value.upper())


def setup(level: str | None = None) -> None:
    """Set the level (argument, else $CIFAR_LOG_LEVEL, else info) and, unless the program configured logging
    itself, send info to stdout and warnings to stderr as whole lines."""
    LOGGER.setLevel(level_from(level))
    if _installed or logging.getLogger().handlers:
        return
    out = _Std("stdout")
    out.addFilter(lambda r: r.levelno < logging.WARNING)
    err = _Std("stderr")
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.setFormatter(_Format())
        LOGGER.addHandler(handler)
        _installed.append(handler)
    LOGGER.propagate = False


def _rank() -> tuple[int, bool]:
    """(this process's rank, whether Accelerate's state exists yet)."""
    from accelerate.state import PartialState

    if PartialState._shared_state == {}:
        return 0, False
    return PartialState().process_index, True


def log(level: int, message: str) -> None:
    if not _installed and not logging.getLogger().handlers:
        setup()   # nobody configured logging (the package used without an entry point): our lines, not lastResort's
    if not LOGGER.isEnabledFor(level):
        return
    rank, known = _rank()
    if os.environ.get("CIFAR_LOG_ALL_RANKS") == "1":
        LOGGER.log(level, message, extra={"rank": rank if known else None})
    elif rank == 0:
        LOGGER.log(level, message)


def debug(message: str) -> None:
    log(logging.DEBUG, message)


def info(message: str) -> None:
    log(logging.INFO, message)


def warning(message: str) -> None:
    log(logging.WARNING, message)


def enabled(level: int = logging.INFO) -> bool:
    return LOGGER.isEnabledFor(level)
