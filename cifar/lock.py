"""One writer per run folder: the main process of a training run holds an exclusive flock on <run>/.lock.

The kernel drops a flock when its holder dies (kill -9, OOM, a crashed node's NFS lease running out), so no lock is
ever stale and nothing is cleaned by hand. The file stays between runs; what it holds (host, pid, start time, SLURM
job) names the holder in the refusal of a second run and means nothing once the lock is free. Read-only users
(evaluate.py, cifar.compare, cifar.sweep) never take it: run_folder.lock_held probes it for an instant, which a start
that finds it busy waits out (PROBE_GRACE).
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time

from . import log
from .errors import UserError, warn
from .run_folder import LOCK, describe_holder

REQUEUE_WAIT = 300.0    # seconds a requeued SLURM job waits for its previous instance; $CIFAR_LOCK_WAIT overrides
PROBE_GRACE = 1.0       # seconds a busy lock is retried before refusing: a reader's probe holds it for an instant


def make_run_dir(path: str) -> None:
    """Create the run folder (and its parents), or one line saying why it cannot be written."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write the run folder {path} ({e.strerror or e}); choose a writable "
                        f"output_dir=... (or fix the folder's permissions or mount)") from None


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK)
        self.file = None    # a file object, so that the lock goes when a failed start drops this object

    def acquire(self) -> None:
        """Take the lock or refuse with one line naming the holder. A requeued SLURM job (the same job id as the
        holder) waits for its previous instance to exit instead. Writes nothing: see record."""
        make_run_dir(os.path.dirname(self.path))
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        waited_since, busy_since = None, time.monotonic()
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() - busy_since < PROBE_GRACE:    # run_folder.lock_held's probe, or a holder
                    time.sleep(0.05)
                    continue
                holder = _read_holder(fd)
                if not _same_job(holder):
                    os.close(fd)
                    raise UserError(f"{os.path.dirname(self.path)} is in use by {describe_holder(holder)}; wait for "
                                    f"it to finish (or stop it), or choose another output_dir") from None
                now = time.monotonic()
                if waited_since is None:
                    waited_since = now
                    warn(f"waiting for the previous instance of SLURM job {holder['slurm_job']} "
                         f"({describe_holder(holder)}) to release {os.path.dirname(self.path)}")
                if now - waited_since > float(os.environ.get("CIFAR_LOCK_WAIT", REQUEUE_WAIT)):
                    os.close(fd)
                    raise UserError(f"{os.path.dirname(self.path)} is still held by {describe_holder(holder)} "
                                    f"after {now - waited_since:.0f} s; stop that process, then requeue") from None
                time.sleep(0.2)
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                warn(f"the file system of {self.path} does not support flock ({e.strerror}); a second run on this "
                     f"folder will not be refused, so do not start one")
                break
        if waited_since is not None:
            warn(f"the previous instance released the folder after {time.monotonic() - waited_since:.1f} s")
        self.file = os.fdopen(fd, "r+b")
        log.debug(f"locked {self.path} (held until this process exits)")

    def record(self) -> None:
        """Name this process as the holder (after the run folder is claimed, so that a refused start leaves every
        file of the folder as it was)."""
        fd = self.file.fileno()
        record = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "slurm_job": os.environ.get("SLURM_JOB_ID"),
                  "slurm_restart": os.environ.get("SLURM_RESTART_COUNT")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)

    def release(self) -> None:
        """The file stays (unlinking it would let a waiter lock an orphaned inode while a third process creates a
        new file); only the lock goes."""
        if self.file is not None:
            self.file.close()
            self.file = None


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _same_job(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    return bool(job) and holder.get("slurm_job") == job
