"""Files that are never seen half-written: atomic replacement, fsync, checksums, and weights with a shape check."""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from safetensors.torch import load_file, save

from .errors import UserError


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable: the directory entry is data too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_durable(path: str, data: bytes) -> None:
    """Write and fsync; an OSError (a full disk, an I/O error) names the file, which a failed write() does not."""
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OSError(e.errno, e.strerror, path) from None


def write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    os.close(fd)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def weights_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict as safetensors (no pickle). Serialised in memory, so that writing it is a plain
    write whose failure is an OSError like any other (safetensors' own writer raises its own error type)."""
    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def save_weights(model: torch.nn.Module, path: str) -> None:
    write_atomic(path, weights_bytes(model))


def load_weights(model: torch.nn.Module, path: str, fix: str) -> None:
    """Load safetensors weights, refusing a file made for another network with one line that ends with `fix`."""
    state = load_file(path)
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    wrong = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        first = sorted(missing or unexpected or wrong)[0]
        raise UserError(f"weights in {path} do not fit model {type(model).__name__} (first mismatch: {first}); {fix}")
    model.load_state_dict(state)
