"""CIFAR-10 on disk -> batches on the device.

The engine sees only a `TrainBatches`: `len()` batches per epoch on this process and `epoch(e, skip)`, which yields
normalised (images, labels) already on the device. What a run sees is a pure function of the seed:
the shuffle order depends on (seed, epoch) and each sample's augmentation on (seed, epoch, sample index), never on
num_workers or the number of processes. `DataLoaderBatches` is the torch DataLoader path; a device-resident path
only has to honour the same two methods.
"""
from __future__ import annotations

import os
import pickle
import tarfile
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .config import DataConfig
from .errors import UserError

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
PAD = 4
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
TRAIN_FILES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_FILES = ["test_batch"]


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, 3, 32, 32)
    labels: np.ndarray  # int64, (N,)

    def __len__(self):
        return len(self.labels)


# ----------------------------------------------------------------------------- reading

def load_split(cfg: DataConfig, train: bool) -> Split:
    limit = cfg.limit_train if train else cfg.limit_test
    if cfg.source == "synthetic":
        return synthetic_split(limit or (50_000 if train else 10_000), train)
    folder = os.path.join(os.path.abspath(cfg.root), FOLDER)
    images, labels = [], []
    for name in TRAIN_FILES if train else TEST_FILES:
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="latin1")
            images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.append(np.asarray(batch["labels"], dtype=np.int64))
        except FileNotFoundError:
            raise UserError(f"CIFAR-10 file {path} is missing; set data.root to the folder holding {FOLDER}/ "
                            f"or set data.download=true")
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as e:
            raise UserError(f"CIFAR-10 file {path} is unreadable ({type(e).__name__}); delete {folder} and "
                            f"download again")
        if limit and sum(map(len, labels)) >= limit:
            break
    split = Split(np.concatenate(images), np.concatenate(labels))
    bad = (split.labels < 0) | (split.labels >= len(CLASSES))
    if bad.any():
        raise UserError(f"CIFAR-10 files in {folder} hold labels outside 0..9; the data is not CIFAR-10")
    return Split(split.images[:limit], split.labels[:limit]) if limit else split


def prepare_cifar10(cfg: DataConfig) -> None:
    """Make sure the pickle files exist, downloading them when allowed. Call on the main process first."""
    if cfg.source != "cifar10":
        return
    root = os.path.abspath(cfg.root)
    folder = os.path.join(root, FOLDER)
    if all(os.path.exists(os.path.join(folder, n)) for n in TRAIN_FILES + TEST_FILES):
        return
    if not cfg.download:
        raise UserError(f"CIFAR-10 not found in {folder}; set data.root to the folder holding {FOLDER}/ "
                        f"or set data.download=true")
    from torchvision.datasets.utils import download_url

    url = os.environ.get("CIFAR10_URL", CIFAR10_URL)  # a mirror (or file://) for clusters without internet
    archive = os.path.join(root, os.path.basename(url))
    try:
        download_url(url, root, md5=CIFAR10_MD5 if url == CIFAR10_URL else None)
        with tarfile.open(archive) as tar:
            tar.extractall(root, filter="data")
    except Exception as e:  # network, disk, corrupt archive: all end the same way for the user
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"downloading CIFAR-10 from {url} into {root} failed ({reason}); download it by hand "
                        f"and extract it there, or point data.root at an existing copy")


def synthetic_split(n: int, train: bool) -> Split:
    """Deterministic CIFAR-shaped data that a network can learn: a fixed coarse pattern per class (8x8-pixel
    blocks, so crops and flips keep it recognisable) plus pixel noise."""
    coarse = np.random.default_rng(10).integers(0, 256, (len(CLASSES), 3, 4, 4)).astype(np.float32)
    prototypes = coarse.repeat(8, axis=2).repeat(8, axis=3)
    rng = np.random.default_rng(1 if train else 2)
    labels = rng.integers(0, len(CLASSES), n)
    noise = rng.normal(0, 70, (n, 3, 32, 32)).astype(np.float32)
    images = np.clip(0.3 * prototypes[labels] + 90 + noise, 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64))


# ----------------------------------------------------------------------------- determinism

_M64 = (1 << 64) - 1


def mix(*values: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): cheap, stable across processes, platforms and workers."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = ((h ^ (v & _M64)) + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h


def augment_params(seed: int, epoch: int, index: int) -> tuple[int, int, bool]:
    """(dy, dx, flip) of one sample's random crop (offsets into the 4-px padded image) and horizontal flip."""
    h = mix(seed, epoch, index)
    return h % (2 * PAD + 1), (h >> 8) % (2 * PAD + 1), bool((h >> 16) & 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(mix(seed, epoch) >> 1))


class EpochSampler(Sampler):
    """Yields (epoch, index) pairs so the epoch reaches the dataset inside any worker, persistent or not."""

    def __init__(self, n: int, seed: int, shuffle: bool):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return self.n

    def __iter__(self):
        order = epoch_order(self.n, self.seed, self.epoch).tolist() if self.shuffle else range(self.n)
        return ((self.epoch, i) for i in order)


class CifarDataset(Dataset):
    """uint8 images; training samples are cropped (4-px zero padding) and flipped as augment_params says."""

    def __init__(self, split: Split, augment: bool, seed: int):
        self.split, self.augment, self.seed = split, augment, seed

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.split.images[index]
        if self.augment:
            dy, dx, flip = augment_params(self.seed, epoch, index)
            padded = np.zeros((3, 32 + 2 * PAD, 32 + 2 * PAD), np.uint8)
            padded[:, PAD:PAD + 32, PAD:PAD + 32] = image
            image = padded[:, dy:dy + 32, dx:dx + 32]
            if flip:
                image = image[:, :, ::-1]
        return torch.from_numpy(np.ascontiguousarray(image)), int(self.split.labels[index])


def normalize(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B,3,H,W) on any device -> float32 normalised. Done after the copy: 4x fewer bytes to move."""
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def denormalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------- batches for the engine

class TrainBatches(Protocol):
    def __len__(self) -> int: ...                      # batches per epoch on this process
    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


class DataLoaderBatches:
    """A torch DataLoader prepared by Accelerate (which shards it per process), normalised on the device."""

    def __init__(self, accelerator, split: Split, batch_size: int, train: bool, augment: bool, seed: int,
                 num_workers: int):
        self.accelerator = accelerator
        self.sampler = EpochSampler(len(split), seed, shuffle=train)
        loader = DataLoader(CifarDataset(split, augment and train, seed), batch_size=batch_size,
                            sampler=self.sampler, num_workers=num_workers,
                            pin_memory=accelerator.device.type == "cuda",
                            persistent_workers=num_workers > 0, drop_last=False)
        self.loader = accelerator.prepare(loader)

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch: int, skip: int = 0):
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        # Accelerate's loader pushes its own epoch counter into the sampler when iterated: set that counter.
        loader.set_epoch(epoch)
        for images, labels in loader:
            yield normalize(images), labels


def build_batches(accelerator, cfg: DataConfig, seed: int) -> tuple[DataLoaderBatches, DataLoaderBatches]:
    """(train, test) batches; the main process reads (or downloads) first, the others wait for it."""
    with accelerator.main_process_first():
        prepare_cifar10(cfg)
        train, test = load_split(cfg, train=True), load_split(cfg, train=False)
    eval_bs = cfg.eval_batch_size or max(cfg.batch_size, 256)
    return (DataLoaderBatches(accelerator, train, cfg.batch_size, True, cfg.augment, seed, cfg.num_workers),
            DataLoaderBatches(accelerator, test, eval_bs, False, False, seed, cfg.num_workers))
