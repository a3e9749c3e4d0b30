"""User-facing errors: one clear line and exit code 2, never a traceback wall; and the advice those lines give (what
fixes a failed write, how to resume the run)."""
from __future__ import annotations

import atexit
import errno
import functools
import os
import shlex
import signal
import sys

from . import log

EXIT_USAGE = 2
# Stopped early on a signal (SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint, or during start-up before there
# was anything to save (a download: cifar/signals.py's interruptible): rerun the same command to resume or start.
# 75 is sysexits' EX_TEMPFAIL, "temporary failure; the user is invited to retry".
EXIT_RESUMABLE = 75
# A write to the run folder failed (disk full, quota, I/O error, file-size limit, read-only, no permission): sysexits'
# EX_IOERR. What was saved before is intact; fix the cause (write_advice) and resume.
EXIT_IO = 74
# What to do about a failed write, by its cause; a training run adds how to resume (set_resume), other programs
# (evaluate.py, export) how to write elsewhere.
_FIXES = {errno.EROFS: "the file system is mounted read-only: remount it read-write",
          errno.EACCES: "permission denied: fix the folder's permissions (or run as its owner)",
          errno.EPERM: "permission denied: fix the folder's permissions (or run as its owner)",
          errno.ENOSPC: "the disk is full: free space",
          errno.EDQUOT: "the disk quota is used up: free space (or raise the quota)",
          errno.EFBIG: "a file-size limit was reached: raise it (ulimit -f)",
          errno.EIO: "the disk reported an I/O error: check it (dmesg, the storage's health)"}
_resume: str | None = None     # how to resume this process's run; None: this program does not train


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
    """An OSError of the kind a full, failing, read-only or forbidden disk raises, as opposed to a bug."""
    return isinstance(e, OSError) and e.errno in _FIXES


def resume_command(output_dir: str, given: bool, argv=None, environ=os.environ) -> str:
    """How to resume the run in output_dir, in words a user can paste: the same command when it names the folder
    (given), else that command with output_dir=... added (a run without one gets a new timestamped folder)."""
    if given:
        return "rerun the same command to resume"
    if "LOCAL_RANK" in environ:        # under accelerate launch or torchrun: sys.argv is the script's, not the command
        return f"rerun your launch command (accelerate launch or torchrun ...) with output_dir={output_dir} added to " \
               f"resume"
    argv = list(sys.argv if argv is None else argv)
    return f"resume with: {shlex.join(['python', *argv, f'output_dir={output_dir}'])}"


def set_resume(how: str | None) -> None:
    """Say how this process's run resumes (resume_command), in every message that advises resuming."""
    global _resume
    _resume = how


def resume_advice() -> str:
    """How to resume, for a stop message (the same command when the run has not said otherwise)."""
    return _resume or "rerun the same command to resume"


def write_advice(err: int | None) -> str:
    """What to do after a failed write with this errno: its fix, then how to resume (a training run) or where else
    to write (evaluate.py, export)."""
    fix = _FIXES.get(err, "fix the disk")
    return f"{fix}, then {_resume}" if _resume else f"{fix}, or write elsewhere (--output)"


class Diverged(UserError):
    """Training diverged (a non-finite loss, evaluation loss or weights): nothing of it was saved, the newest
    checkpoint is the last good one. Exit 2 like any setting to fix (optim.lr, train.grad_clip): rerunning as it is
    would diverge again, so batch scripts must not requeue it (they requeue 75 only)."""


class AlreadyFinished(Exception):
    """A rerun found its run finished with the same config: nothing to do, nothing written (one line, exit 0)."""


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint (or before it began, with nothing to save)."""


def cli(main):
    """Wrap an entry point: logging set up; a UserError prints one line on stderr and exits 2 (74 for a disk
    fault, 75 when stopped with a checkpoint); a run already finished is one info line and exit 0."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        return _handled(main, *args, **kwargs)

    return wrapper


def _handled(main, *args, **kwargs):
    """main, with the errors a user can fix turned into one line and an exit status."""
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
        verb = "access" if e.errno in (errno.EACCES, errno.EPERM) else "write"     # a read is refused too
        print(f"error: cannot {verb} {_named(e.filename)} ({e.strerror}); {write_advice(e.errno)}",
              file=sys.stderr, flush=True)
        sys.exit(EXIT_IO)
    except Stopped as e:
        print(f"stopped: {e}", file=sys.stderr, flush=True)
        # The checkpoint is safe; what is left is interpreter shutdown (the process group, W&B), during which
        # Python puts fatal default handlers back. The launcher SIGTERMs the other ranks as soon as the first
        # one exits: ignored, it cannot turn their resumable exit into a kill (an ignored signal stays so).
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)
        sys.exit(EXIT_RESUMABLE)


_A_RANK = []


def leave_without_finalizing() -> None:
    """This process is one rank of several (runtime.make_accelerator): as a command, it ends as exit_as_command
    says."""
    _A_RANK.append(True)


def exit_as_command(main) -> None:
    """A script's `if __name__ == "__main__"`: main(), then the process exits with its status (what main returns:
    None is 0). A rank of a multi-process run leaves without interpreter finalization (below); main called from
    one's own script returns as any function does."""
    try:
        code = main()
    except SystemExit as e:
        code = e.code
    _leave_if_a_rank(code)
    sys.exit(code)


def _leave_if_a_rank(code) -> None:
    """A rank of a multi-process run leaves without interpreter finalization: there, gloo's C++ worker threads
    (their pending work holds tensors with Python references) could still be destroyed, and a rank whose training
    had finished and saved now and then died with "terminate called without an active exception" (SIGABRT, -6),
    which the launcher reports as the job failing (torch's own fix, an atexit destroy, was abandoned:
    pytorch/pytorch#179291). Everything a finished process does still happens first: the exit handlers (logging,
    W&B) run and the streams are flushed; our files are written atomically or flushed as they go."""
    if not _A_RANK:
        return
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code if isinstance(code, int) else (0 if code is None else 1))


def _named(filename) -> str:
    """The file a failed write names; write_atomic's temporary file stands for the folder it was written in."""
    if not filename:
        return "the run folder"
    name = str(filename)
    return f"a file in {os.path.dirname(name)}" if os.path.basename(name).startswith(".tmp-") else name
