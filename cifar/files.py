"""Files that are never seen half-written: atomic replacement, fsync, checksums, and weights with a shape check."""
from __future__ import annotations

import hashlib
import os
import tempfile

import torch
from safetensors.torch import load_file, save_file

from .errors import UserError


def fsync_dir(path: str) -> None:
    """Make a rename inside `path` durable: the directory entry is data too."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_atomic(path: str, data: bytes) -> None:
    """Write via a temporary file in the same folder and rename, so readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_weights(model: torch.nn.Module, path: str) -> None:
    """The model's state_dict as safetensors (no pickle), written beside `path` and renamed into place."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = path + ".tmp"
    save_file(state, tmp)
    os.replace(tmp, path)


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
