"""User-facing errors: one clear line and exit code 2, never a traceback wall."""
from __future__ import annotations

import errno
import functools
import signal
import sys

from . import log

EXIT_USAGE = 2
# Stopped early on a signal (SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint, or during start-up before there
# was anything to save (a download: cifar/signals.py's interruptible): rerun the same command to resume or start.
# 75 is sysexits' EX_TEMPFAIL, "temporary failure; the user is invited to retry".
EXIT_RESUMABLE = 75
# A write to the run folder failed (disk full, quota, I/O error, file-size limit): sysexits' EX_IOERR. What was saved
# before is intact; free space and rerun the same command to resume.
EXIT_IO = 74
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


SHOWN = 80   # characters of a user's value that an error message repeats


def shorten(value, width: int = SHOWN) -> str:
    """repr(value) for an error message, cut to `width` characters with an ellipsis and the value's full length
    (characters of a string, items of a list or mapping), so that a megabyte of input stays one short line. The
    repr is built piece by piece and stops once past `width`: a huge value is never turned into text whole."""
    text = ""
    for piece in _repr_pieces(value, width):
        text += piece
        if len(text) > width:
            break
    else:
        return text
    sized = isinstance(value, (str, list, tuple, dict))
    size = f" ({len(value):,} {'characters' if isinstance(value, str) else 'items'})" if sized else ""
    return f"{text[:width]}...{size}"


def _repr_pieces(value, width: int):
    """repr(value) in pieces: containers item by item, a long string by its first width + 1 characters."""
    if isinstance(value, str) and len(value) > width:
        yield repr(value[:width + 1])
    elif isinstance(value, dict):
        yield "{"
        for i, (key, item) in enumerate(value.items()):
            yield ", " if i else ""
            yield from _repr_pieces(key, width)
            yield ": "
            yield from _repr_pieces(item, width)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "[" if isinstance(value, list) else "("
        for i, item in enumerate(value):
            yield ", " if i else ""
            yield from _repr_pieces(item, width)
        yield "]" if isinstance(value, list) else ",)" if len(value) == 1 else ")"
    else:
        yield repr(value)


def warn(message: str) -> None:
    """A problem the run survives: a warning record (cifar/log.py), by default one `warning: ...` line on stderr."""
    log.warning(message)


class UserError(Exception):
    """Bad input the user can fix (config, data, checkpoint). The message names the problem and the fix."""
    exit_code = EXIT_USAGE


class SaveFailed(UserError):
    """Writing to the run folder failed (disk full, I/O error); the message names the path and what is intact."""
    exit_code = EXIT_IO


def disk_fault(e: BaseException) -> bool:
    """An OSError of the kind a full or failing disk raises, as opposed to a bug."""
    return isinstance(e, OSError) and e.errno in _DISK_ERRNOS


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint (or before it began, with nothing to save)."""


def cli(main):
    """Wrap an entry point: logging set up; a UserError prints one line on stderr and exits 2 (74 for a disk
    fault, 75 when stopped with a checkpoint)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            try:
                log.setup()   # $CIFAR_LOG_LEVEL; an entry point's --log-level sets it again
            except ValueError as e:
                raise UserError(str(e)) from None
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(e.exit_code)
        except OSError as e:
            if not disk_fault(e):
                raise
            # a write outside a checkpoint save (metrics, status, the final weights): the checkpoints are intact
            print(f"error: cannot write {e.filename or 'the run folder'} ({e.strerror}); free space (or fix the "
                  f"disk) and rerun the same command to resume from the newest checkpoint", file=sys.stderr,
                  flush=True)
            sys.exit(EXIT_IO)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            # The checkpoint is safe; what is left is interpreter shutdown (the process group, W&B), during which
            # Python puts fatal default handlers back. The launcher SIGTERMs the other ranks as soon as the first
            # one exits: ignored, it cannot turn their resumable exit into a kill (an ignored signal stays so).
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            sys.exit(EXIT_RESUMABLE)

    return wrapper
