"""Files that are never seen half-written: atomic replacement, fsync, checksums, and weights with a shape check:
safetensors, and the tutorial's bare PyTorch state_dict files (read with weights_only=True only)."""
from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import secrets
import stat
import warnings

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
    """Write via a temporary file in the same folder and rename, so readers never see half a file. Only a regular
    file is replaced: the rename would put a file in place of a device, a FIFO or a socket (as root, /dev/null)."""
    refuse_non_file(path)
    fd, tmp = _create_beside(path)
    os.close(fd)
    try:
        write_durable(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def refuse_non_file(path: str) -> None:
    """One line for a path that names something other than a regular file (a link is followed): writing there
    would replace it. A path that does not exist yet is fine."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return   # nothing there (or nothing we can see): the write itself says what is wrong
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
        raise UserError(f"{path} is {kind}, which is left as it is: only a regular file is written or replaced "
                        f"here; pass the path of a file")


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"))


def _create_beside(path: str) -> tuple[int, str]:
    """A new, empty temporary file in path's folder, created as open() creates one: mode 0666 less the umask (the
    kernel applies it), so collaborators read what the umask lets them; mkstemp's 0600 would shut them out."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        tmp = os.path.join(folder, f".tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def weights_bytes(model: torch.nn.Module, metadata: dict[str, str] | None = None) -> bytes:
    """The model's state_dict as safetensors (no pickle), with string metadata in its header. Serialised in memory,
    so that writing it is a plain write whose failure is an OSError like any other (safetensors' own writer raises
    its own error type)."""
    return save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, metadata=metadata)


def save_weights(model: torch.nn.Module, path: str, metadata: dict[str, str] | None = None) -> None:
    write_atomic(path, weights_bytes(model, metadata))


def load_weights(model: torch.nn.Module, path: str, fix: str) -> None:
    """Load safetensors weights, refusing a file made for another network with one line that ends with `fix`."""
    load_fitting(model, load_file(path), path, fix)


def load_fitting(model: torch.nn.Module, state: dict, path: str, fix: str) -> None:
    """Load a state_dict read from `path`, refusing one made for another network (other names or shapes) with one
    line naming the first mismatch and ending with `fix`."""
    own = model.state_dict()
    missing, unexpected = own.keys() - state.keys(), state.keys() - own.keys()
    wrong = sorted(k for k in own.keys() & state.keys() if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        if wrong and not (missing or unexpected):
            first = f"{wrong[0]}: {list(state[wrong[0]].shape)} in the file, {list(own[wrong[0]].shape)} here"
        else:
            first = f"{sorted(missing)[0]} missing from the file" if missing else f"{sorted(unexpected)[0]} unexpected"
        raise UserError(f"weights in {path} do not fit model {type(model).__name__} (first mismatch: {first}); {fix}")
    model.load_state_dict(state)


# What torch.load turns a file into when it is not a PyTorch file at all, or a truncated one.
_NOT_TORCH = (RuntimeError, EOFError, KeyError, ValueError, UnicodeDecodeError)


def load_tensors_only(path: str):
    """torch.load(path) with weights_only=True, on the CPU. torch's warnings on a foreign file are silenced (they
    would precede the caller's one line); a file that needs more than tensors and plain containers raises
    pickle.UnpicklingError, whose text (torch's, advising weights_only=False) must never reach the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.load(path, map_location="cpu", weights_only=True)


def refused_global(e: pickle.UnpicklingError) -> str | None:
    """The class or function torch's weights-only unpickler refused to import, from its message: "Unsupported
    global: GLOBAL x.y" when it could be allowed, "unsupported GLOBAL x.y whose module x is blocked" (os, ...)."""
    needed = re.search(r"unsupported (?:global: )?GLOBAL (\S+)", str(e), re.IGNORECASE)
    return needed.group(1) if needed else None


def read_state_dict(path: str) -> dict:
    """A bare PyTorch state_dict file (torch.save(net.state_dict(), PATH), as the tutorial saves it), read with
    weights_only=True only: unpickling arbitrary objects runs code the file chooses, so a file that needs it is
    refused, as is anything that is not a flat mapping of names to tensors. One line each, naming the file."""
    try:
        state = load_tensors_only(path)
    except FileNotFoundError:
        raise UserError(f"{path} not found; pass a state_dict saved with torch.save(net.state_dict(), PATH), or a "
                        f"run folder written by train.py") from None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}); check its permissions") from None
    except pickle.UnpicklingError as e:
        needed = refused_global(e)
        if not needed:
            raise _not_torch(path, e) from None
        raise UserError(f"{path} needs arbitrary unpickling to load (it holds a {needed}, not only "
                        f"tensors), which could run code from the file, so it is refused: only weights are loaded "
                        f"(weights_only=True); save the network with torch.save(net.state_dict(), PATH)") from None
    except _NOT_TORCH as e:
        raise _not_torch(path, e) from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        what = (f"a {type(state).__name__}" if not isinstance(state, dict) else
                f"a mapping with keys {', '.join(map(str, list(state)[:4]))}" if state else "an empty mapping")
        raise UserError(f"{path} is not a state_dict (it holds {what}, not layer names to tensors); save the "
                        f"network's weights with torch.save(net.state_dict(), PATH)")
    return state


def _not_torch(path: str, e: Exception) -> UserError:
    return UserError(f"{path} is not a PyTorch file, or is truncated or corrupt ({type(e).__name__}); pass a "
                     f"state_dict saved with torch.save(net.state_dict(), PATH)")


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    """The model's state_dict as torch.save writes it (what the tutorial loads with torch.load(PATH,
    weights_only=True)): CPU tensors, each its own storage, so the file holds no more than the weights."""
    buffer = io.BytesIO()
    torch.save({k: v.detach().cpu().clone() for k, v in model.state_dict().items()}, buffer)
    return buffer.getvalue()
