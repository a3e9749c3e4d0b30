"""User-facing errors: one clear line and exit code 2, never a traceback wall."""
from __future__ import annotations

import functools
import signal
import sys

EXIT_USAGE = 2
# Stopped early on a signal (SIGTERM, SIGINT, SIGUSR1) after saving a checkpoint: rerun the same command to resume.
# 75 is sysexits' EX_TEMPFAIL, "temporary failure; the user is invited to retry".
EXIT_RESUMABLE = 75


def warn(message: str) -> None:
    """A problem the run survives: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


class UserError(Exception):
    """Bad input the user can fix (config, data, checkpoint). The message names the problem and the fix."""


class Stopped(Exception):
    """Training stopped early on a signal, after saving a checkpoint."""


def cli(main):
    """Wrap an entry point so a UserError prints one line on stderr and exits 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USAGE)
        except Stopped as e:
            print(f"stopped: {e}", file=sys.stderr, flush=True)
            # The checkpoint is safe; what is left is interpreter shutdown (the process group, W&B), during which
            # Python puts fatal default handlers back. The launcher SIGTERMs the other ranks as soon as the first
            # one exits: ignored, it cannot turn their resumable exit into a kill (an ignored signal stays so).
            for sig in (signal.SIGTERM, signal.SIGUSR1):
                signal.signal(sig, signal.SIG_IGN)
            sys.exit(EXIT_RESUMABLE)

    return wrapper
