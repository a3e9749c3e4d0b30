"""The data layer: the real pickle format, download, and data that depends only on (seed, epoch, index)."""
import functools
import hashlib
import http.server
import os
import tarfile
import threading

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import read_json, write_cifar
from inprocess import call, refusal
from PIL import Image
from torchvision import transforms

from cifar.config import DataConfig
from cifar.data import (STATS, CifarDataset, DataLoaderBatches, DeviceBatches, augment_params, denormalize,
                        epoch_order, load_split, normalize, synthetic_split)
from cifar.evaluation import evaluate
from cifar.models import TutorialNet


def test_reads_the_official_pickle_layout(cifar_root):
    cfg = DataConfig(root=cifar_root)
    train, test = load_split(cfg, train=True), load_split(cfg, train=False)
    assert train.images.shape == (84, 3, 32, 32) and train.images.dtype == np.uint8
    assert test.images.shape == (37, 3, 32, 32) and train.labels.dtype == np.int64
    limited = load_split(DataConfig(root=cifar_root, limit_train=20), train=True)
    assert np.array_equal(limited.images, train.images[:20])


def test_synthetic_is_deterministic_and_shaped_like_cifar():
    a, b = synthetic_split(50, True), synthetic_split(50, True)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert a.images.shape == (50, 3, 32, 32) and set(a.labels) <= set(range(10))
    assert not np.array_equal(synthetic_split(50, False).images, a.images)


def test_augmentation_is_a_function_of_seed_epoch_index(cifar_root):
    split = load_split(DataConfig(root=cifar_root), train=True)
    ds = CifarDataset(split, augment=True, seed=3)
    x1, _ = ds[(2, 5)]
    x2, _ = CifarDataset(split, augment=True, seed=3)[(2, 5)]
    assert torch.equal(x1, x2)
    params = {augment_params(3, e, 5) for e in range(40)}
    assert len(params) > 10                                   # epochs really differ
    dy, dx, flip = augment_params(3, 2, 5)
    padded = np.zeros((3, 40, 40), np.uint8)
    padded[:, 4:36, 4:36] = split.images[5]
    expect = padded[:, dy:dy + 32, dx:dx + 32]
    expect = expect[:, :, ::-1] if flip else expect
    assert np.array_equal(x1.numpy(), expect)                 # crop with 4-px zero padding + flip
    reflected = CifarDataset(split, augment=True, seed=3, pad_mode="reflect")[(2, 5)][0].numpy()
    expect = np.pad(split.images[5], ((0, 0), (4, 4), (4, 4)), mode="reflect")[:, dy:dy + 32, dx:dx + 32]
    assert np.array_equal(reflected, expect[:, :, ::-1] if flip else expect)
    assert torch.equal(CifarDataset(split, augment=False, seed=3)[(2, 5)][0], torch.from_numpy(split.images[5]))


def _epoch_batches(split, num_workers, epoch):
    acc = Accelerator(cpu=True)
    cfg = DataConfig(batch_size=16, augment=True, num_workers=num_workers)
    batches = DataLoaderBatches(acc, split, cfg, train=True, seed=7)
    return [(x.clone(), y.clone()) for x, y in batches.epoch(epoch)]


def test_batches_do_not_depend_on_num_workers_and_change_per_epoch(cifar_root):
    split = load_split(DataConfig(root=cifar_root), train=True)
    a0 = _epoch_batches(split, 0, epoch=1)
    a2 = _epoch_batches(split, 2, epoch=1)
    assert len(a0) == len(a2) == 6
    for (x0, y0), (x2, y2) in zip(a0, a2):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)
    b0 = _epoch_batches(split, 0, epoch=2)
    assert not torch.equal(a0[0][1], b0[0][1])                # a new shuffle each epoch
    seen = torch.cat([y for _, y in a0])
    assert sorted(seen.tolist()) == sorted(split.labels.tolist())   # each sample exactly once per epoch


@pytest.mark.parametrize("stats", sorted(STATS))
def test_normalize_round_trip(stats):
    x = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.allclose(denormalize(normalize(x, stats), stats), x.float() / 255, atol=1e-6)


@pytest.mark.parametrize("stats", sorted(STATS))
def test_normalize_is_torchvisions_to_tensor_then_normalize_bit_for_bit(stats):
    """data.normalize=tutorial feeds the network exactly what the tutorial's transforms.Compose([ToTensor(),
    Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))]) makes of a PIL image; cifar, its Normalize(mean, std)."""
    images = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(*STATS[stats])])
    theirs = torch.stack([transform(Image.fromarray(image)) for image in images])
    ours = normalize(torch.from_numpy(images).permute(0, 3, 1, 2), stats)
    assert torch.equal(ours, theirs)
    other = "cifar" if stats == "tutorial" else "tutorial"
    assert not torch.allclose(normalize(torch.from_numpy(images).permute(0, 3, 1, 2), other), theirs, atol=0.01)


@pytest.mark.parametrize("kind", [DataLoaderBatches, DeviceBatches])
@pytest.mark.parametrize("stats", sorted(STATS))
def test_every_batch_path_and_the_evaluation_samples_use_the_configs_normalisation(cifar_root, kind, stats):
    """Training and test batches, first_images (FastNet's whitening) on both loaders, and the sample images
    evaluation denormalises for predictions.png, all follow data.normalize."""
    acc = Accelerator(cpu=True)
    cfg = DataConfig(root=cifar_root, batch_size=8, num_workers=0, normalize=stats)
    split = load_split(cfg, train=True)
    raw = torch.from_numpy(split.images)
    test_split = load_split(cfg, train=False)
    test = kind(acc, test_split, cfg, False, seed=3)
    assert torch.equal(torch.cat([x for x, _ in test.epoch(0)]), normalize(torch.from_numpy(test_split.images), stats))
    train = kind(acc, split, cfg, True, seed=3)
    assert torch.equal(train.first_images(5), normalize(raw[:5], stats))
    x, y = next(iter(train.epoch(0)))
    order = epoch_order(len(split), 3, 0)[:8]
    assert torch.equal(y, torch.from_numpy(split.labels)[order]) and torch.equal(x, normalize(raw[order], stats))
    result = evaluate(TutorialNet(), test, acc, samples=4)
    assert np.allclose(result.samples[0], test_split.images[:4] / 255, atol=1e-6)


def test_download_extracts_an_archive_when_missing(tmp_path):
    src = write_cifar(str(tmp_path / "src"), n_train=40, n_test=10)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(os.path.join(src, "cifar-10-batches-py"), arcname="cifar-10-batches-py")
    root = tmp_path / "fresh"
    # a real HTTP download (cifar/download.py), from a server on loopback, of an archive that is not the official
    # one: its MD5 is given, as a user with a re-encoded copy does
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
        call("train.py", "--config", "configs/tutorial.yaml", f"data.root={root}", "data.num_workers=0",
             "data.batch_size=20", "train.epochs=1", f"output_dir={tmp_path}/r", CIFAR10_URL=url,
             CIFAR10_MD5=hashlib.md5(archive.read_bytes()).hexdigest())
    finally:
        server.shutdown()
        server.server_close()
    assert (root / "cifar-10-batches-py" / "test_batch").exists()
    # every file of the archive, extracted byte for byte, and nothing else
    with tarfile.open(archive) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    extracted = {f"cifar-10-batches-py/{name}": (root / "cifar-10-batches-py" / name).read_bytes()
                 for name in os.listdir(root / "cifar-10-batches-py")}
    assert len(members) == 7 and extracted.keys() == members.keys()
    for name, data in members.items():
        assert extracted[name] == data, name
    assert (root / "cifar-10-python.tar.gz").read_bytes() == archive.read_bytes()       # the archive kept, whole
    # the run trained on what was extracted: 40 images in batches of 20, tested on the 10
    assert read_json(tmp_path / "r" / "summary.json")["steps"] == 2
    assert (tmp_path / "r" / "model.safetensors").exists()
    assert sorted(os.listdir(root)) == ["cifar-10-batches-py", "cifar-10-python.tar.gz"]   # no .part, no staging


def test_failed_download_is_one_clear_line(tmp_path, capsys):
    url = (tmp_path / "missing.tar.gz").as_uri()
    line = refusal(capsys, "train.py", "--config", "configs/tutorial.yaml", f"data.root={tmp_path}/d",
                   f"output_dir={tmp_path}/r", CIFAR10_URL=url)
    # the problem (what failed, from where, into where, why), then the fix
    assert line.startswith(f"error: downloading CIFAR-10 from {url} into {tmp_path / 'd'} failed ("), line
    assert line.endswith("; download it by hand and extract it there, or point data.root at an existing copy"), line


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_pickle_is_one_clear_line(tmp_path, capsys, damage):
    root = write_cifar(str(tmp_path / "data"), n_train=20, n_test=10)
    folder = os.path.join(root, "cifar-10-batches-py")
    path = os.path.join(folder, "data_batch_2")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100] if damage == "truncate" else b"not a pickle" * 10)
    line = refusal(capsys, "train.py", "--config", "configs/tutorial.yaml", f"data.root={root}",
                   f"output_dir={tmp_path}/r")
    # the file named, then the fix: a fresh copy
    assert line.startswith(f"error: CIFAR-10 file {path} is unreadable ("), line
    assert line.endswith(f"; delete {folder} and download CIFAR-10 again (data.download=true)"), line
