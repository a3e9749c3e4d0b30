"""Issue 24's data boundary: everything read from outside is checked before use and nothing in it runs.

Dataset pickles go through a restricted unpickler and every array is checked against the others; archives are
MD5-checked (mirrors too), downloaded with a timeout to a temporary name and extracted within bounds; predict.py's
images are capped in pixels before decoding and every Pillow mode becomes 8-bit RGB with the right scale. Refusals
are one `error:` line and exit 2. Most tests call the functions, or the entry points' main(argv), in-process; a
subprocess only where the claim is about a process (a signal, peak memory)."""
import os
import pickle
import signal
import sys

import numpy as np
import pytest
from conftest import ROOT, write_cifar, write_cifar100

from cifar.config import DataConfig
from cifar.data import load_split
from cifar.errors import UserError

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the entry point, called in-process)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train.main installs its stop handlers and leaves them when start-up fails: put pytest's back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def one_error_line(capsys, call) -> str:
    """Run an entry point's main in-process: it must exit 2 with exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        call()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def train_on(root, out, *extra) -> list[str]:
    return ["--config", "configs/debug.yaml", "data.source=cifar10", f"data.root={root}", "data.download=false",
            "train.epochs=1", f"output_dir={out}", *extra]


# ----------------------------------------------------------------------------- pickles run nothing

class Hostile:
    """Unpickling this calls `call(*args)`: what a crafted dataset file does."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def dump(path, obj, protocol=pickle.DEFAULT_PROTOCOL):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)


@pytest.mark.parametrize("dataset, name", [("cifar10", "data_batch_1"), ("cifar10", "test_batch"),
                                           ("cifar10", "batches.meta"), ("cifar100", "meta")])
def test_a_hostile_pickle_in_any_dataset_file_runs_nothing(tmp_path, capsys, dataset, name):
    """A file whose unpickling would call builtins.open (create a marker) is refused before anything is called,
    in one line naming the file and the global it asked for; exit 2."""
    marker = tmp_path / "pwned"
    root = str(tmp_path / "data")
    folder = os.path.join(write_cifar(root, 20, 10) if dataset == "cifar10" else write_cifar100(root, 20, 10),
                          "cifar-10-batches-py" if dataset == "cifar10" else "cifar-100-python")
    dump(os.path.join(folder, name), {"data": Hostile(open, str(marker), "w"), "labels": [0],
                                      "label_names": Hostile(open, str(marker), "w")})
    line = one_error_line(capsys, lambda: train.main(train_on(root, tmp_path / "r", f"data.dataset={dataset}")))
    assert not marker.exists()
    assert os.path.join(folder, name) in line and "io.open" in line and "refused" in line, line


def test_os_system_in_a_protocol_2_pickle_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    root = write_cifar(str(tmp_path / "data"), 20, 10)
    dump(os.path.join(root, "cifar-10-batches-py", "test_batch"), Hostile(os.system, f"touch {marker}"), protocol=2)
    with pytest.raises(UserError, match=r"test_batch asks to call (posix|os)\.system"):
        load_split(DataConfig(root=root), train=False)
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_what_the_safe_unpickler_reads(tmp_path, protocol):
    """Every protocol the files come in: an official-style protocol-2 pickle (numpy's _reconstruct, bytes through
    _codecs.encode), and numpy's protocol-5 _frombuffer; int64 labels as an array too."""
    root = write_cifar(str(tmp_path / "data"), 10, 6)
    folder = os.path.join(root, "cifar-10-batches-py")
    data = np.arange(6 * 3072).astype(np.uint8).reshape(6, 3072)
    dump(os.path.join(folder, "test_batch"), {"batch_label": b"testing batch 1 of 1", "data": data,
                                              "labels": np.array([0, 1, 2, 9, 4, 5]), "filenames": [b"a.png"] * 6,
                                              "extra": (1.5, None, True)}, protocol=protocol)
    split = load_split(DataConfig(root=root), train=False)
    assert np.array_equal(split.images, data.reshape(6, 3, 32, 32)) and split.labels.tolist() == [0, 1, 2, 9, 4, 5]


def test_files_as_make_cifar10_and_conftest_write_them_load(tmp_path):
    """conftest's CIFAR-10 and CIFAR-100 copies (the default protocol) and make_cifar10.py's (protocol 4)."""
    assert len(load_split(DataConfig(root=write_cifar(str(tmp_path / "a"), 12, 5)), train=True)) == 12
    c100 = DataConfig(dataset="cifar100", root=write_cifar100(str(tmp_path / "b"), 12, 5))
    assert len(load_split(c100, train=False)) == 5
    root = write_cifar(str(tmp_path / "c"), 12, 5)
    batch = {"batch_label": "test", "labels": [3, 1], "data": np.zeros((2, 3072), np.uint8), "filenames": ["0", "1"]}
    dump(os.path.join(root, "cifar-10-batches-py", "test_batch"), batch, protocol=4)
    assert load_split(DataConfig(root=root), train=False).labels.tolist() == [3, 1]


def test_a_file_larger_than_any_cifar_file_is_not_read(tmp_path, monkeypatch):
    root = write_cifar(str(tmp_path / "data"), 10, 5)
    monkeypatch.setattr("cifar.safe_pickle.MAX_BYTES", 1000)
    with pytest.raises(UserError, match=r"test_batch is 0 MiB, more than any CIFAR file"):
        load_split(DataConfig(root=root), train=False)


# ----------------------------------------------------------------------------- arrays checked against each other

def rewrite(root, name, **changes):
    path = os.path.join(root, "cifar-10-batches-py", name)
    with open(path, "rb") as f:
        batch = pickle.load(f)
    dump(path, {**batch, **changes})


@pytest.mark.parametrize("changes, words", [
    (dict(labels=[1, 2, 3]), "holds 6 images but 3 'labels'"),
    (dict(labels=[1] * 7), "holds 6 images but 7 'labels'"),
    (dict(labels=[1.0] * 6), "'labels' are float64, not integers"),
    (dict(labels="123456"), "'labels' is not a list of integers"),
    (dict(labels=[0, 1, 2, 3, 4, 10]), "labels outside 0..9 (e.g. 10)"),
    (dict(data=np.zeros((6, 3072), np.float32)), "its data is float32, not uint8 pixels"),
    (dict(data=np.full((6, 3072), 256, np.int32)), "its pixels run 256..256, outside 0..255"),
    (dict(data=np.zeros((6, 3071), np.uint8)), "its data is an array of shape [6, 3071], not rows of 3072"),
    (dict(data=np.zeros((6, 3, 32, 32), np.uint8)), "an array of shape [6, 3, 32, 32]"),
    (dict(data=[[0] * 3072] * 6), "its data is a list"),
])
def test_every_array_is_checked(tmp_path, changes, words):
    root = write_cifar(str(tmp_path / "data"), 10, 6)
    rewrite(root, "test_batch", **changes)
    with pytest.raises(UserError) as e:
        load_split(DataConfig(root=root), train=False)
    assert words in str(e.value) and "test_batch" in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_integer_pixels_in_range_are_read_exactly(tmp_path):
    root = write_cifar(str(tmp_path / "data"), 10, 6)
    data = np.random.default_rng(0).integers(0, 256, (6, 3072)).astype(np.int64)
    rewrite(root, "test_batch", data=data)
    assert np.array_equal(load_split(DataConfig(root=root), train=False).images, data.reshape(6, 3, 32, 32))


@pytest.mark.parametrize("names", [["a"] * 9, [1] * 10, "airplane", None])
def test_the_meta_files_names_are_checked(tmp_path, names):
    root = write_cifar(str(tmp_path / "data"), 10, 6)
    dump(os.path.join(root, "cifar-10-batches-py", "batches.meta"), {"label_names": names})
    with pytest.raises(UserError, match=r"batches.meta does not hold 10 class names under 'label_names'"):
        load_split(DataConfig(root=root), train=False)
