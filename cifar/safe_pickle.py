"""Reading the CIFAR pickle files without letting them run code.

The datasets ship as Python pickles, and `pickle.load` calls whatever function a file names (`os.system`,
`builtins.eval`, any class's `__reduce__`): a file from a mirror, a shared folder or an old download would run with
the user's rights. The files hold only data, so this unpickler resolves exactly the globals that data needs and
refuses any other before anything is called. It also refuses a file larger than any CIFAR file before reading it.

What the official files (and the copies tests/conftest.py and make_cifar10.py write) ask for:
- numpy arrays: `numpy.core.multiarray._reconstruct` (numpy 2 spells it `numpy._core`), `numpy.ndarray` and
  `numpy.dtype` up to protocol 4; `numpy._core.numeric._frombuffer` at protocol 5;
- bytes in a protocol-2 pickle written by Python 3: `_codecs.encode(text, "latin1")`.
dict, list, tuple, str, bytes, int, float, bool and None need no global at all.
"""
from __future__ import annotations

import os
import pickle

import numpy as np

try:
    from numpy._core import multiarray, numeric        # numpy 2
except ImportError:                                      # numpy 1
    from numpy.core import multiarray, numeric

from .errors import UserError

# CIFAR-100's train file, the largest, is about 155 MB; a file three times that is not a CIFAR file.
MAX_BYTES = 512 * 2**20


class RefusedGlobal(pickle.UnpicklingError):
    """The file names a function or class that plain data does not need."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes: latin-1 only (looking another name up imports
    that codec's module)."""
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591"):
        raise RefusedGlobal(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1", errors)


ALLOWED = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}
for _core in ("numpy.core", "numpy._core"):
    # resolved through numpy itself, so the names keep working whichever numpy wrote or reads the file
    ALLOWED[(f"{_core}.multiarray", "_reconstruct")] = multiarray._reconstruct
    ALLOWED[(f"{_core}.numeric", "_frombuffer")] = numeric._frombuffer


class _DataOnly(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{module}.{name}") from None


def load(path: str, fix: str) -> object:
    """The object pickled in `path` (bytes of Python 2 read as latin-1, as the official files need), made of
    plain data and numpy arrays only. A file asking for anything else, or larger than MAX_BYTES, is a UserError
    naming it and ending with `fix`; nothing in it has run. Other problems (missing, truncated, not a pickle)
    raise as pickle.load's would."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_BYTES:
            raise UserError(f"{path} is {size / 2**20:.0f} MiB, more than any CIFAR file (at most "
                            f"{MAX_BYTES // 2**20} MiB is read); {fix}")
        try:
            return _DataOnly(f, encoding="latin1").load()
        except RefusedGlobal as e:
            raise UserError(f"{path} asks to call {e.name} when read, which could run any code, so it is refused "
                            f"(CIFAR files hold only lists, dicts, strings, numbers and numpy arrays); {fix}") from None
