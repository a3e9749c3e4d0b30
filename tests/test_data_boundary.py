"""Issue 24's data boundary: everything read from outside is checked before use and nothing in it runs.

Dataset pickles go through a restricted unpickler and every array is checked against the others; archives are
MD5-checked (mirrors too), downloaded with a timeout to a temporary name and extracted within bounds; predict.py's
images are capped in pixels before decoding and every Pillow mode becomes 8-bit RGB with the right scale. Refusals
are one `error:` line and exit 2. Most tests call the functions, or the entry points' main(argv), in-process; a
subprocess only where the claim is about a process (a signal, peak memory)."""
import ast
import hashlib
import http.server
import importlib
import io
import os
import pickle
import re
import signal
import socket
import struct
import subprocess
import sys
import tarfile
import threading
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from conftest import ROOT, command, env, write_cifar, write_cifar100
from PIL import Image, ImageOps
from torchvision import transforms

from cifar import safe_pickle
from cifar.config import DataConfig
from cifar.data import CIFAR10_MD5, load_split, prepare
from cifar.errors import Stopped, UserError
from cifar.models import TutorialNet
from cifar.predict_cli import read_image
from cifar.signals import StopRequest

sys.path.insert(0, ROOT)
import train  # noqa: E402  (the entry point, called in-process)


@pytest.fixture(autouse=True)
def keep_signal_handlers():
    """train.main installs its stop handlers and leaves them when start-up fails: put pytest's back (and forget
    the stale StopRequest, which signals.interruptible would consult)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)
    StopRequest.active = None


def one_error_line(capsys, call) -> str:
    """Run an entry point's main in-process: it must exit 2 with exactly one `error:` line on stderr."""
    with pytest.raises(SystemExit) as exit_:
        call()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert exit_.value.code == 2 and len(lines) == 1 and err.endswith("\n") and lines[0].startswith("error: "), err
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


def test_bytes_are_decoded_as_latin_1_only(tmp_path):
    """_codecs.encode is allowed for what protocol-2 pickles use it for (bytes as latin-1 text), no other codec."""
    path = tmp_path / "test_batch"
    path.write_bytes(b"\x80\x02c_codecs\nencode\nX\x02\x00\x00\x00hiX\x05\x00\x00\x00rot13\x86R.")
    with pytest.raises(UserError, match="asks to call _codecs.encode with encoding 'rot13'"):
        safe_pickle.load(str(path), "fix")


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


# ----------------------------------------------------------------------------- archives and downloads

def archive_of(tmp_path, folder_root, name="mirror.tar.gz", extra=()) -> str:
    """A .tar.gz of `folder_root`'s cifar-10-batches-py/ (plus `extra` (arcname, bytes) members), as a mirror
    would serve it."""
    path = str(tmp_path / name)
    with tarfile.open(path, "w:gz") as tar:
        tar.add(os.path.join(folder_root, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
        for arcname, data in extra:
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def md5(path) -> str:
    with open(path, "rb") as f:
        return hashlib.md5(f.read()).hexdigest()


@pytest.fixture
def no_download_env(monkeypatch):
    for name in ("CIFAR10_URL", "CIFAR10_MD5", "CIFAR_DOWNLOAD_TIMEOUT", "CIFAR_DOWNLOAD_TRIES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_a_hostile_mirror_archive_is_refused_by_its_md5(tmp_path, capsys, no_download_env):
    """A mirror (file://) serving an archive whose data_batch_1 would run os.system: without CIFAR10_MD5 the
    official MD5 refuses it in one line naming the URL, both hashes and the variable, and nothing is kept. Even
    trusted by its MD5, the pickle inside runs nothing."""
    marker = tmp_path / "pwned"
    src = write_cifar(str(tmp_path / "src"), 10, 5)
    dump(os.path.join(src, "cifar-10-batches-py", "data_batch_1"), Hostile(os.system, f"touch {marker}"))
    archive = archive_of(tmp_path, src)
    url = "file://" + archive
    no_download_env.setenv("CIFAR10_URL", url)
    root = tmp_path / "data"
    line = one_error_line(capsys, lambda: train.main(train_on(root, tmp_path / "r", "data.download=true")))
    assert f"{url} sent an archive with MD5 {md5(archive)}, not {CIFAR10_MD5}" in line
    assert f"CIFAR10_MD5={md5(archive)}" in line and "not kept" in line
    assert os.listdir(root) == [] and not marker.exists()
    no_download_env.setenv("CIFAR10_MD5", md5(archive))
    line = one_error_line(capsys, lambda: train.main(train_on(root, tmp_path / "r2", "data.download=true")))
    assert "data_batch_1 asks to call" in line and not marker.exists()


def test_a_file_url_mirror_with_its_own_md5_or_none(tmp_path, no_download_env):
    src = write_cifar(str(tmp_path / "src"), 10, 5)
    archive = archive_of(tmp_path, src)
    no_download_env.setenv("CIFAR10_URL", "file://" + archive)
    for check in (md5(archive), "NONE"):
        root = tmp_path / f"data-{check}"
        no_download_env.setenv("CIFAR10_MD5", check)
        prepare(DataConfig(root=str(root)))
        assert len(load_split(DataConfig(root=str(root)), train=True)) == 10
        assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]
    no_download_env.setenv("CIFAR10_MD5", "abc")
    with pytest.raises(UserError, match="CIFAR10_MD5='abc' is neither an MD5 \\(32 hex digits\\) nor 'none'"):
        prepare(DataConfig(root=str(tmp_path / "other")))


def test_an_archive_left_by_an_earlier_run_is_checked_and_named(tmp_path, no_download_env):
    """A partial archive under the final name (a run killed while writing it, before downloads went to .part) is
    named, not trusted; the complete one is used without a download; with the check off, a damaged one is named."""
    src = write_cifar(str(tmp_path / "src"), 10, 5)
    archive = archive_of(tmp_path, src)
    root = tmp_path / "data"
    root.mkdir()
    left = root / "cifar-10-python.tar.gz"
    left.write_bytes(open(archive, "rb").read()[:2000])
    no_download_env.setenv("CIFAR10_URL", "file:///nowhere/cifar-10-python.tar.gz")
    no_download_env.setenv("CIFAR10_MD5", md5(archive))
    with pytest.raises(UserError, match=f"{left} is partial or not the CIFAR-10 archive .* delete it and rerun"):
        prepare(DataConfig(root=str(root)))
    no_download_env.setenv("CIFAR10_MD5", "none")
    with pytest.raises(UserError, match=f"the archive {left} is damaged or not a .tar.gz .*; delete it"):
        prepare(DataConfig(root=str(root)))
    left.write_bytes(open(archive, "rb").read())
    prepare(DataConfig(root=str(root)))                      # no download: file:///nowhere is never opened
    assert len(load_split(DataConfig(root=str(root)), train=False)) == 5


def test_extraction_writes_only_the_datasets_folder_within_bounds(tmp_path, no_download_env):
    src = write_cifar(str(tmp_path / "src"), 10, 5)
    archive = archive_of(tmp_path, src, extra=[("evil.sh", b"rm -rf ~"), ("cifar-10-batches-py/../../up", b"x")])
    no_download_env.setenv("CIFAR10_URL", "file://" + archive)
    no_download_env.setenv("CIFAR10_MD5", "none")
    root = tmp_path / "data"
    with pytest.raises(UserError, match="is damaged or not a .tar.gz \\(OutsideDestinationError\\)"):
        prepare(DataConfig(root=str(root)))
    assert not (tmp_path / "up").exists() and not (root / "cifar-10-batches-py").exists()
    archive = archive_of(tmp_path, src, name="two.tar.gz", extra=[("evil.sh", b"rm -rf ~")])
    no_download_env.setenv("CIFAR10_URL", "file://" + archive)
    os.remove(root / "cifar-10-python.tar.gz")
    prepare(DataConfig(root=str(root)))
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]       # no evil.sh
    no_download_env.setattr("cifar.data.MAX_EXTRACTED", 10_000)
    with pytest.raises(UserError, match="holds more than 64 files or 0 MiB under cifar-10-batches-py/"):
        prepare(DataConfig(root=str(tmp_path / "small")))


@pytest.fixture
def stalled_server():
    """A loopback socket that takes connections (the kernel's backlog) and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield server
    server.close()


@pytest.mark.parametrize("tries", [1, 2])
def test_a_stalled_mirror_times_out_in_one_line(tmp_path, capsys, no_download_env, stalled_server, tries):
    url = f"http://127.0.0.1:{stalled_server.getsockname()[1]}/cifar-10-python.tar.gz"
    no_download_env.setenv("CIFAR10_URL", url)
    no_download_env.setenv("CIFAR_DOWNLOAD_TIMEOUT", "0.3")
    no_download_env.setenv("CIFAR_DOWNLOAD_TRIES", str(tries))
    root = tmp_path / "data"
    start = time.monotonic()
    line = one_error_line(capsys, lambda: train.main(train_on(root, tmp_path / "r", "data.download=true")))
    # the timeout's words say it ended the wait; the bound says no try waited much past its 0.3 s
    assert f"downloading CIFAR-10 from {url} into {root} failed (no answer within 0.3 s ($CIFAR_DOWNLOAD_TIMEOUT)" \
           in line and (f", {tries} tries)" in line) == (tries > 1), line
    assert time.monotonic() - start < 30 and os.listdir(root) == []          # no .part, no empty archive


def test_a_server_error_is_retried_and_a_404_is_not(tmp_path, no_download_env):
    """A mirror answering 503 once, then the archive: the second try gets it. A 404 fails at once, in one line."""
    src = write_cifar(str(tmp_path / "src"), 10, 5)
    archive = open(archive_of(tmp_path, src), "rb").read()
    requests = []

    class Flaky(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            if self.path == "/missing.tar.gz" or len(requests) == 1:
                self.send_error(404 if self.path == "/missing.tar.gz" else 503)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Flaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    no_download_env.setenv("CIFAR10_MD5", hashlib.md5(archive).hexdigest())
    no_download_env.setenv("CIFAR_DOWNLOAD_TIMEOUT", "0.5")          # also the longest pause between tries
    try:
        no_download_env.setenv("CIFAR10_URL", f"{base}/cifar-10-python.tar.gz")
        prepare(DataConfig(root=str(tmp_path / "data")))
        assert requests == ["/cifar-10-python.tar.gz"] * 2
        no_download_env.setenv("CIFAR10_URL", f"{base}/missing.tar.gz")
        with pytest.raises(UserError, match=r"missing.tar.gz into .* failed \(HTTP 404 Not Found\);"):
            prepare(DataConfig(root=str(tmp_path / "other")))
        assert requests[2:] == ["/missing.tar.gz"]
    finally:
        server.shutdown()
        server.server_close()
    assert len(load_split(DataConfig(root=str(tmp_path / "data")), train=False)) == 5


def test_a_signal_earlier_in_start_up_ends_it_before_the_download(tmp_path, no_download_env):
    stop = StopRequest().install()
    try:
        os.kill(os.getpid(), signal.SIGUSR1)                 # handled before kill returns (Python, main thread)
        no_download_env.setenv("CIFAR10_URL", "file:///nowhere/cifar-10-python.tar.gz")
        with pytest.raises(Stopped, match="SIGUSR1 received while downloading CIFAR-10 .* before training began"):
            prepare(DataConfig(root=str(tmp_path / "data")))
    finally:
        stop.uninstall()


@pytest.mark.slow
def test_sigterm_ends_a_train_py_hanging_in_its_download(tmp_path, stalled_server):
    """train.py waiting on a mirror that never answers (a 60 s timeout) exits within seconds of SIGTERM, with
    one line, the resumable status (75: nothing was saved, the same command starts again) and no .part left."""
    root = tmp_path / "data"
    url = f"http://127.0.0.1:{stalled_server.getsockname()[1]}/cifar-10-python.tar.gz"
    proc = subprocess.Popen(command("train.py", train_on(root, tmp_path / "r", "data.download=true")), cwd=ROOT,
                            env=env(CIFAR10_URL=url, CIFAR_DOWNLOAD_TIMEOUT="60"), stderr=subprocess.PIPE, text=True)
    try:
        stalled_server.settimeout(120)
        connection = stalled_server.accept()[0]              # train.py has connected: it waits for an answer
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        # half the download timeout: an exit after it could be the timeout's, not the signal's (and the line below
        # tells them apart as well)
        err = proc.communicate(timeout=30)[1]
    finally:
        proc.kill()
    connection.close()
    assert time.monotonic() - sent < 10     # the signal ended the wait, not the download's own timeout
    lines = err.strip().splitlines()
    assert proc.returncode == 75 and len(lines) == 1, err
    assert lines[0].startswith(f"stopped: SIGTERM received while downloading CIFAR-10 from {url}"), err
    assert not os.path.exists(root / "cifar-10-python.tar.gz.part")


# ----------------------------------------------------------------------------- predict.py's images

def big_png(path, side: int) -> None:
    """A black side x side RGB PNG, never whole in memory: under a megabyte on disk, huge decoded. Its pixel data is
    one zlib stream of `side` identical rows (filter byte + pixels). A row compressed after a full flush, which makes
    the compressor forget what came before, comes out as the same bytes every time: compressed once and repeated,
    then closed by an empty final block and the Adler-32 of all the rows, as zlib would close it (compressing all
    507 MB took seconds)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + 3 * side)
    packer = zlib.compressobj(9, strategy=zlib.Z_RLE)
    first = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)        # the stream's 2-byte header, then the row
    again = packer.compress(row) + packer.flush(zlib.Z_FULL_FLUSH)
    assert first[2:] == again
    adler = 1
    for _ in range(side):
        adler = zlib.adler32(row, adler)
    idat = first + again * (side - 1) + b"\x03\x00" + struct.pack(">I", adler)      # final, empty, fixed-Huffman block
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def test_the_big_png_is_a_png_pillow_decodes(tmp_path):
    """big_png's hand-closed zlib stream is a valid PNG: a small one decodes to black pixels of its size, and zlib,
    which checks the Adler-32, reads its pixel data as the rows it stands for."""
    big_png(tmp_path / "small.png", 300)
    image = Image.open(tmp_path / "small.png")
    image.load()
    assert image.size == (300, 300) and image.mode == "RGB" and not np.asarray(image).any()
    data, chunks = (tmp_path / "small.png").read_bytes()[8:], {}
    while data:
        (length,), kind = struct.unpack(">I", data[:4]), data[4:8]
        chunks[kind], data = data[8:8 + length], data[12 + length:]
    assert zlib.decompress(chunks[b"IDAT"]) == b"\0" * (300 * (1 + 3 * 300))


@pytest.fixture(scope="module")
def huge_png(tmp_path_factory):
    path = tmp_path_factory.mktemp("huge") / "huge.png"
    big_png(path, 13000)
    return path


def gray(mode: str, values, fmt: str = "PNG", tmp=None):
    """A 32x32 image of `mode` whose pixels cycle through `values`, saved and read back as read_image reads it."""
    array = np.resize(np.array(values), (32, 32))
    if mode == "I;16B":
        image = Image.frombytes(mode, (32, 32), array.astype(">u2").tobytes())
    else:
        image = Image.fromarray(array.astype({"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]))
    path = tmp / f"{mode}.{fmt.lower()}"
    assert image.mode == mode
    image.save(path, fmt)
    assert Image.open(path).mode == mode
    return read_image(str(path))[0]


def cycled(values) -> torch.Tensor:
    return torch.from_numpy(np.resize(np.array(values, np.uint8), (32, 32))).expand(3, 32, 32)


@pytest.mark.parametrize("mode, values, expected, fmt", [
    ("I;16", [0, 128, 129, 257, 32768, 65535], [0, 0, 1, 1, 128, 255], "PNG"),
    ("I;16B", [0, 257, 32768, 65535], [0, 1, 128, 255], "TIFF"),
    ("I", [-5, 0, 257, 32768, 65535, 100_000], [0, 0, 1, 128, 255, 255], "TIFF"),
    ("F", [-0.5, 0.0, 0.5, 1.0, 2.0, float("nan")], [0, 0, 128, 255, 255, 0], "TIFF"),
])
def test_deep_grayscale_is_scaled_not_clipped(tmp_path, mode, values, expected, fmt):
    """16-bit and 32-bit integer pixels as 0..65535 (65535 -> 255, 32768 -> 128), float as 0..1."""
    assert torch.equal(gray(mode, values, fmt, tmp_path), cycled(expected))


def test_every_8_bit_mode_becomes_the_rgb_a_person_sees(tmp_path):
    """1, L, LA, P (with and without a transparent index), RGBA, CMYK: transparency onto white, hand-computed."""
    def read(image, fmt="PNG", **save):
        path = tmp_path / f"{image.mode}-{len(os.listdir(tmp_path))}.{fmt.lower()}"
        image.save(path, fmt, **save)
        assert Image.open(path).mode == image.mode
        return read_image(str(path))[0]

    def rgb(colours) -> torch.Tensor:
        return torch.from_numpy(np.resize(np.array(colours, np.uint8), (32, 32, 3))).permute(2, 0, 1)

    bits = Image.fromarray(np.resize(np.array([0, 1], bool), (32, 32)))
    assert torch.equal(read(bits), cycled([0, 255]))
    assert torch.equal(read(Image.fromarray(np.resize(np.array([0, 7, 255], np.uint8), (32, 32)), "L")),
                       cycled([0, 7, 255]))
    la = np.resize(np.array([[90, 0], [90, 255], [0, 255]], np.uint8), (32, 32, 2))
    assert torch.equal(read(Image.fromarray(la, "LA")), cycled([255, 90, 0]))     # transparent: white
    palette = Image.fromarray(np.resize(np.array([0, 1, 2], np.uint8), (32, 32)), "P")
    palette.putpalette([200, 10, 20, 0, 90, 0, 1, 2, 3])
    assert torch.equal(read(palette), rgb([[200, 10, 20], [0, 90, 0], [1, 2, 3]]))
    assert torch.equal(read(palette, transparency=1), rgb([[200, 10, 20], [255, 255, 255], [1, 2, 3]]))
    rgba = np.resize(np.array([[10, 20, 30, 255], [10, 20, 30, 0]], np.uint8), (32, 32, 4))
    assert torch.equal(read(Image.fromarray(rgba, "RGBA")), rgb([[10, 20, 30], [255, 255, 255]]))
    cmyk = np.resize(np.array([[0, 0, 0, 0], [255, 0, 0, 0], [0, 255, 255, 0], [0, 0, 0, 255]], np.uint8),
                     (32, 32, 4))
    assert torch.equal(read(Image.fromarray(cmyk, "CMYK"), "TIFF"),
                       rgb([[255, 255, 255], [0, 255, 255], [255, 0, 0], [0, 0, 0]]))


def test_an_image_over_the_pixel_cap_is_refused_from_its_header(huge_png, monkeypatch):
    """A 13000x13000 PNG (169 megapixels, a few hundred KB) is refused before decoding, in one line naming the
    file, its size and the cap; above Pillow's own bomb limit too, and never with Pillow's warning."""
    path = huge_png
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserError, match=f"{path} is 13000x13000 pixels \\(169 megapixels\\), more than the 64 "
                                            f"megapixels predict.py decodes"):
            read_image(str(path))
        monkeypatch.setattr("cifar.predict_cli.MAX_PIXELS", 10**9)       # Pillow's limit (179 MP) speaks first
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000_000)
        with pytest.raises(UserError, match=f"{path} has more than 1000 megapixels, the most predict.py decodes "
                                            f"\\(Image size \\(169000000 pixels\\) exceeds limit"):
            read_image(str(path))


@pytest.mark.slow
def test_predict_py_on_a_13000_pixel_square_png_stays_small(tmp_path, huge_png):
    """The process: predict.py refuses the 169-megapixel PNG in one line (exit 1: some inputs failed) and its
    peak resident memory stays under 1.5 GB (torch alone takes about 0.8 GB here; decoded, the image would add
    507 MB, 676 MB as RGBA)."""
    path = huge_png
    weights = tmp_path / "cifar_net.pth"
    torch.save(TutorialNet().state_dict(), weights)
    proc = subprocess.Popen(command("predict.py", ["--checkpoint", str(weights), str(path)]), cwd=ROOT, env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)               # this child's own peak RSS (kilobytes on Linux)
    proc.returncode = os.waitstatus_to_exitcode(status)
    assert proc.returncode == 1 and err.strip().splitlines() == [
        f"error: {path} is 13000x13000 pixels (169 megapixels), more than the 64 megapixels predict.py decodes; "
        f"shrink it first (the network sees 32x32)"], err
    assert usage.ru_maxrss * 1024 < 1.5 * 2**30, usage.ru_maxrss
    print(f"predict.py's peak RSS on the 13000x13000 PNG: {usage.ru_maxrss / 1024:.0f} MiB")


def test_a_large_jpeg_is_decoded_at_a_reduced_scale_and_its_size_reported_upright(tmp_path):
    """A 1600x1200 photo turned by its EXIF orientation (6: a quarter turn) is decoded at a quarter of its scale
    (draft), reported as shown (1200x1600), and comes out as torchvision's Resize + CenterCrop of the full decode
    but for the resampling's last bits."""
    yy, xx = np.mgrid[0:1200, 0:1600]
    photo = np.stack([xx * 255 // 1600, yy * 255 // 1200, (xx + yy) % 256], -1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(photo).save(tmp_path / "photo.jpg", quality=95, exif=exif)
    x, size = read_image(str(tmp_path / "photo.jpg"))
    full = ImageOps.exif_transpose(Image.open(tmp_path / "photo.jpg"))
    expected = transforms.Compose([transforms.Resize(32), transforms.CenterCrop(32), transforms.PILToTensor()])(full)
    assert size == (1200, 1600) == full.size
    assert (x.int() - expected.int()).abs().float().mean() < 2, (x.int() - expected.int()).abs().float().mean()


# ----------------------------------------------------------------------------- torch.load: weights only, our line

def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for name in sorted(os.listdir(os.path.join(ROOT, "cifar"))):
        if name.endswith(".py"):
            with open(os.path.join(ROOT, "cifar", name)) as f:
                tree = ast.parse(f.read())
            calls += [(name, call) for call in ast.walk(tree)
                      if isinstance(call, ast.Call) and ast.unparse(call.func) == "torch.load"]
    # one loader (files.load_tensors_only) holds the package's only torch.load; checkpoint.py's training.pt and
    # files.py's .pth files both go through it, so the scan below is not vacuous
    assert {name for name, _ in calls} == {"files.py"}
    users = {name for name in os.listdir(os.path.join(ROOT, "cifar")) if name.endswith(".py")
             and "load_tensors_only(" in open(os.path.join(ROOT, "cifar", name)).read()}
    assert users >= {"files.py", "checkpoint.py"}
    for name, call in calls:
        assert any(k.arg == "weights_only" and getattr(k.value, "value", None) is True for k in call.keywords), \
            f"{name}: {ast.unparse(call)}"


@pytest.mark.parametrize("script", ["evaluate", "predict"])
@pytest.mark.parametrize("kind", ["torch.save", "pickle protocol 2"])
def test_a_hostile_pth_is_our_one_line_not_torchs_advice(tmp_path, capsys, script, kind):
    """A .pth whose loading would call os.system, given to evaluate.py or predict.py: refused by torch's
    weights-only unpickler, told in our line naming the global; torch's "weights_only=False" advice never shown."""
    marker = tmp_path / "pwned"
    path = tmp_path / "cifar_net.pth"
    hostile = {"conv1.weight": Hostile(os.system, f"touch {marker}")}
    if kind == "torch.save":
        torch.save(hostile, path)
    else:
        dump(path, hostile, protocol=2)
    image = tmp_path / "cat.png"
    Image.new("RGB", (32, 32)).save(image)
    entry = importlib.import_module(script)
    args = ["--checkpoint", str(path)] + ([str(image)] if script == "predict" else ["data.source=synthetic"])
    line = one_error_line(capsys, lambda: entry.main(args))
    assert re.search(f"{path} needs arbitrary unpickling to load \\(it holds a (posix|os).system", line), line
    assert "weights_only=False" not in line and not marker.exists()
