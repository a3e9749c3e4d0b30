"""User-facing errors: one clear line and exit code 2, never a traceback wall."""
from __future__ import annotations

import errno
import functools
import signal
import sys

from . import log

EXIT_USAGE = 2
# Stopped early on a signal (SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint: rerun the same command to resume.
# 75 is sysexits' EX_TEMPFAIL, "temporary failure; the user is invited to retry".
EXIT_RESUMABLE = 75
# A write to the run folder failed (disk full, quota, I/O error, file-size limit): sysexits' EX_IOERR. What was saved
# before is intact; free space and rerun the same command to resume.
EXIT_IO = 74
_DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.EROFS}


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


class Diverged(UserError):
    """Training diverged (a non-finite loss, evaluation loss or weights): nothing of it was saved, the newest
    checkpoint is the last good one. Exit 2 like any setting to fix (optim.lr, train.grad_clip): rerunning as it is
    would diverge again, so batch scripts must not requeue it (they requeue 75 only)."""


class AlreadyFinished(Exception):
    """A rerun found its run finished with the same config: nothing to do, nothing written (one line, exit 0)."""


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint."""


def cli(main):
    """Wrap an entry point: logging set up; a UserError prints one line on stderr and exits 2 (74 for a disk
    fault, 75 when stopped with a checkpoint); a run already finished is one info line and exit 0."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            try:
                log.setup()   # $CIFAR_LOG_LEVEL; an entry point's --log-level sets it again
            except ValueError as e:
                raise UserError(str(e)) from None
            return main(*args, **kwargs)
        except AlreadyFinished as e:
            log.info(str(e))
            return None
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
