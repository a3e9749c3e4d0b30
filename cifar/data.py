"""CIFAR-10 or CIFAR-100 on disk -> batches on the device.

The engine sees only a `TrainBatches`: `len()` batches per epoch on this process and `epoch(e, skip)`, which yields
normalised (images, labels) already on the device. What a run sees is a pure function of the seed:
the shuffle order depends on (seed, epoch) and each sample's augmentation on (seed, epoch, sample index), never on
num_workers or the number of processes. `DataLoaderBatches` is the torch DataLoader path; a device-resident path
only has to honour the same two methods.
"""
from __future__ import annotations

import gzip
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import zlib
from dataclasses import dataclass
from typing import Iterator, Protocol

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from . import augment as aug
from . import download, safe_pickle
from .config import DataConfig
from .errors import UserError
from .signals import interruptible

CLASSES = ("plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
# (mean, std) per channel of the [0, 1] pixels, by data.normalize's name: CIFAR-10's training-set statistics, or
# the tutorial's transforms.Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)) (pixels to [-1, 1]). A network sees
# differently scaled inputs under the other one, so weights only score as trained with their own.
STATS = {"cifar": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
         "tutorial": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))}
PAD = 4
# The third value hashed with (seed, epoch) for the random numbers of a policy and of the batched augmentations:
# streams of their own, apart from the crop's (mix(seed, epoch, index)) and the device path's (1, 2)
POLICY_STREAM, BATCH_STREAM = 7, 8
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# CIFAR-100's 100 fine classes in label order, as its `meta` file lists them (fine_label_names): the names of
# synthetic CIFAR-100 data, and of a run's classes when the meta file is not at hand (predict.py on another machine).
CIFAR100_CLASSES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man", "maple_tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak_tree", "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree",
    "plain", "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm")


@dataclass(frozen=True)
class DatasetInfo:
    """Everything that differs between the datasets: where the files are, what they hold, where to get them."""
    name: str                      # data.dataset's value
    title: str                     # what people call it, in messages
    folder: str                    # what the official archive extracts to, inside data.root
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: str                 # the labels' key in each data pickle
    meta_file: str
    meta_key: str                  # the class names' key in the meta file
    url: str
    md5: str                       # of the official archive; a mirror ($<url_env>) must match it too, or $<md5_env>
    url_env: str                   # the environment variable naming a mirror (or file://) for clusters offline
    md5_env: str                   # the environment variable naming a re-encoded archive's MD5, or `none`
    classes: tuple[str, ...]       # built-in names: CIFAR-10's are the tutorial's short ones, always used

    @property
    def num_classes(self) -> int:
        return len(self.classes)


DATASETS = {
    "cifar10": DatasetInfo("cifar10", "CIFAR-10", "cifar-10-batches-py",
                           tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",), "labels",
                           "batches.meta", "label_names", CIFAR10_URL, CIFAR10_MD5, "CIFAR10_URL", "CIFAR10_MD5",
                           CLASSES),
    "cifar100": DatasetInfo("cifar100", "CIFAR-100", "cifar-100-python", ("train",), ("test",), "fine_labels",
                            "meta", "fine_label_names", CIFAR100_URL, CIFAR100_MD5, "CIFAR100_URL", "CIFAR100_MD5",
                            CIFAR100_CLASSES),
}


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    return DATASETS[cfg.dataset]


def num_classes(cfg: DataConfig) -> int:
    return dataset_info(cfg).num_classes


def class_names(cfg: DataConfig) -> tuple[str, ...]:
    """The dataset's class names in label order. CIFAR-10: the tutorial's (plane, car, ...), whatever its meta
    file says (airplane, automobile, ...). CIFAR-100: its meta file's fine_label_names when the file is there;
    otherwise (synthetic data, no files on this machine) the built-in ones, the same."""
    info = dataset_info(cfg)
    if info.name == "cifar10" or cfg.source == "synthetic":
        return info.classes
    return _dataset_classes(info, os.path.join(os.path.abspath(cfg.root), info.folder))


def _dataset_classes(info: DatasetInfo, folder: str) -> tuple[str, ...]:
    """The names a run on the files in `folder` uses: CIFAR-10's built-in ones, CIFAR-100's meta file's. The meta
    file is checked either way (it says the folder holds the dataset); a missing one leaves the built-in names."""
    path = os.path.join(folder, info.meta_file)
    if not os.path.exists(path):
        return info.classes
    meta = _read_pickle(path, info, folder)
    names = meta.get(info.meta_key) if isinstance(meta, dict) else None
    if not (isinstance(names, (list, tuple)) and len(names) == info.num_classes
            and all(isinstance(n, str) for n in names)):
        raise UserError(f"{info.title} file {path} does not hold {info.num_classes} class names under "
                        f"{info.meta_key!r}; the data is not {info.title}: {_refetch(info, folder)}")
    return info.classes if info.name == "cifar10" else tuple(names)


@dataclass
class Split:
    images: np.ndarray  # uint8, (N, 3, 32, 32)
    labels: np.ndarray  # int64, (N,)
    classes: tuple[str, ...] = CLASSES   # names of labels 0..len-1

    def __len__(self):
        return len(self.labels)


# ----------------------------------------------------------------------------- reading

def load_split(cfg: DataConfig, train: bool) -> Split:
    limit = cfg.limit_train if train else cfg.limit_test
    info = dataset_info(cfg)
    if cfg.source == "synthetic":
        split = synthetic_split(limit or (50_000 if train else 10_000), train, info.num_classes)
        return Split(split.images, split.labels, info.classes)
    folder = os.path.join(os.path.abspath(cfg.root), info.folder)
    classes = _dataset_classes(info, folder)
    images, labels = [], []
    for name in info.train_files if train else info.test_files:
        batch_images, batch_labels = read_batch(os.path.join(folder, name), info, folder)
        images.append(batch_images)
        labels.append(batch_labels)
        if limit and sum(map(len, labels)) >= limit:
            break
    split = Split(np.concatenate(images), np.concatenate(labels), classes)
    return Split(split.images[:limit], split.labels[:limit], split.classes) if limit else split


# What a damaged or foreign pickle raises while being read (the safe unpickler's refusals are UserErrors).
_UNREADABLE = (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, AttributeError, OverflowError,
               struct.error)


def _refetch(info: DatasetInfo, folder: str) -> str:
    return f"delete {folder} and download {info.title} again (data.download=true)"


def _read_pickle(path: str, info: DatasetInfo, folder: str) -> object:
    """What a dataset file holds, read without running code from it (cifar/safe_pickle.py); one line otherwise."""
    root = os.path.dirname(folder)
    try:
        return safe_pickle.load(path, _refetch(info, folder))
    except FileNotFoundError:
        raise UserError(_other_dataset_hint(root, info) or
                        f"{info.title} file {path} is missing; set data.root to the folder holding "
                        f"{info.folder}/ or set data.download=true") from None
    except _UNREADABLE as e:
        raise UserError(f"{info.title} file {path} is unreadable ({type(e).__name__}); "
                        f"{_refetch(info, folder)}") from None
    except OSError as e:
        raise UserError(f"cannot read {info.title} file {path} ({e.strerror}); check its permissions") from None


def read_batch(path: str, info: DatasetInfo, folder: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 3, 32, 32), labels int64 (N,)) of one data file, each array checked against the other
    and against what CIFAR holds: nothing is cast or cut silently (a short labels list would shift every later
    label onto the wrong image)."""
    batch = _read_pickle(path, info, folder)
    try:
        if not isinstance(batch, dict):
            raise KeyError("data")
        data, raw_labels = batch["data"], batch[info.label_key]
    except KeyError as e:
        other = _other_dataset_hint(os.path.dirname(folder), info)
        raise UserError(other or f"{info.title} file {path} has no {e.args[0]!r} entry; it is not "
                                 f"{info.title} (data.dataset={info.name}); {_refetch(info, folder)}") from None
    images = _checked_images(data, path, _refetch(info, folder))
    return images, _checked_labels(raw_labels, len(images), path, info, folder)


def _checked_images(data: object, path: str, fix: str) -> np.ndarray:
    """`data` as N x 3 x 32 x 32 uint8: rows of 3072 integers in 0..255 (uint8 in the official files)."""
    if not isinstance(data, np.ndarray) or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        what = f"an array of shape {list(data.shape)}" if isinstance(data, np.ndarray) else f"a {type(data).__name__}"
        raise UserError(f"{path}: its data is {what}, not rows of 3072 pixel bytes (3 x 32 x 32); {fix}")
    if data.dtype != np.uint8:
        if data.dtype.kind not in "iu":
            raise UserError(f"{path}: its data is {data.dtype}, not uint8 pixels; {fix}")
        if data.size and (data.min() < 0 or data.max() > 255):
            raise UserError(f"{path}: its pixels run {data.min()}..{data.max()}, outside 0..255; {fix}")
    return data.astype(np.uint8, copy=False).reshape(-1, 3, 32, 32)


def _checked_labels(raw: object, n: int, path: str, info: DatasetInfo, folder: str) -> np.ndarray:
    """The labels as int64: one integer per image, each a class of the dataset."""
    key, fix = info.label_key, _refetch(info, folder)
    labels = np.asarray(raw) if isinstance(raw, (list, tuple, np.ndarray)) else None
    if labels is None or labels.ndim != 1:
        raise UserError(f"{path}: its {key!r} is not a list of integers; {fix}")
    if len(labels) != n:
        raise UserError(f"{path} holds {n} images but {len(labels)} {key!r}; each image needs one label: {fix}")
    if n and labels.dtype.kind not in "iu":
        raise UserError(f"{path}: its {key!r} are {labels.dtype}, not integers; {fix}")
    bad = (labels < 0) | (labels >= info.num_classes)
    if bad.any():
        raise UserError(f"{info.title} file {path} holds labels outside 0..{info.num_classes - 1} (e.g. "
                        f"{labels[bad][0]}); the data is not {info.title}")
    return labels.astype(np.int64)


def _other_dataset(root: str, info: DatasetInfo) -> DatasetInfo | None:
    """The other dataset whose files `root` holds (its folder beside where this one's should be, root pointing into
    it, or its files under this one's folder name), if any."""
    for other in DATASETS.values():
        places = [os.path.join(root, other.folder), root, os.path.join(root, info.folder)]
        if other.name != info.name and any(
                all(os.path.isfile(os.path.join(p, n)) for n in other.train_files + other.test_files) for p in places):
            return other
    return None


def _other_dataset_hint(root: str, info: DatasetInfo) -> str | None:
    """When `root` lacks this dataset but holds the other one: the line naming both and the fix."""
    other = _other_dataset(root, info)
    return other and (f"data.dataset={info.name} asks for {info.title} ({info.folder}/ in {root}), but {root} holds "
                      f"{other.title} files ({other.folder}/); set data.dataset={other.name} to use them, or point "
                      f"data.root at the folder holding {info.folder}/")


def prepare(cfg: DataConfig) -> None:
    """Make sure the dataset's pickle files exist, downloading them when allowed. Call on the main process first."""
    if cfg.source == "synthetic":
        return
    info = dataset_info(cfg)
    root = os.path.abspath(cfg.root)
    folder = os.path.join(root, info.folder)
    if all(os.path.exists(os.path.join(folder, n)) for n in info.train_files + info.test_files):
        return
    if not cfg.download:
        raise UserError(_other_dataset_hint(root, info) or f"{info.title} not found in {folder}; set data.root to the folder holding "
                                 f"{info.folder}/ or set data.download=true")
    url = os.environ.get(info.url_env, info.url)  # a mirror (or file://) for clusters without internet
    archive = os.path.join(root, os.path.basename(info.url))
    md5 = download.expected_md5(info.md5, info.md5_env)
    os.makedirs(root, exist_ok=True)
    with interruptible(f"downloading {info.title} from {url}"):
        _get_archive(info, url, archive, md5)
        _extract(info, archive, root)
    if not all(os.path.exists(os.path.join(folder, n)) for n in info.train_files + info.test_files):
        raise UserError(f"the archive {archive} did not hold {info.title} ({info.folder}/ with "
                        f"{', '.join(info.train_files + info.test_files)}); remove it and download the official one")


def _get_archive(info: DatasetInfo, url: str, archive: str, md5: str | None) -> None:
    """`archive` in place with the expected MD5 (md5 None: unchecked): the one found there, or a fresh download."""
    if os.path.exists(archive):    # an earlier download (only a checked one gets this name) or the user's own copy
        actual = md5 and download.md5_of(archive)
        if actual != md5:
            raise UserError(f"{archive} is partial or not the {info.title} archive (MD5 {actual}, expected {md5}); "
                            f"delete it and rerun, or if it is a re-encoded copy you trust set "
                            f"{info.md5_env}={actual} (or {info.md5_env}=none)")
        return
    root = os.path.dirname(archive)
    try:
        actual = download.fetch(url, archive)
    except download.FETCH_ERRORS as e:
        other = _other_dataset(root, info)
        hint = f" ({root} holds {other.title}: data.dataset={other.name} uses it)" if other else ""
        raise UserError(f"downloading {info.title} from {url} into {root} failed ({download.describe(e)}); download "
                        f"it by hand and extract it there, or point data.root at an existing copy{hint}") from None
    if md5 and actual != md5:
        os.remove(archive + ".part")
        source = f"the official {info.title} archive's" if md5 == info.md5 else f"${info.md5_env}"
        raise UserError(f"{url} sent an archive with MD5 {actual}, not {md5} ({source}), so it was not kept; if it "
                        f"is a re-encoded copy you trust, set {info.md5_env}={actual} (or {info.md5_env}=none)")
    os.replace(archive + ".part", archive)


# What extraction may write: the official archives hold 8 (CIFAR-10) and 5 (CIFAR-100) files, 178 and 161 MiB.
MAX_MEMBERS, MAX_EXTRACTED = 64, 1024 * 2**20


def _extract(info: DatasetInfo, archive: str, root: str) -> None:
    """The dataset's folder out of `archive` into `root`, within bounds: its regular files only (tarfile's "data"
    filter refuses paths outside, links and devices), at most MAX_MEMBERS of them and MAX_EXTRACTED bytes, checked
    from the headers before anything is written. Files are extracted beside and moved into place once complete, so
    an interrupted extraction leaves no truncated dataset file."""
    staging = tempfile.mkdtemp(prefix=f".{info.folder}.", dir=root)
    try:
        with tarfile.open(archive) as tar:
            tar.extractall(staging, members=_bounded_members(tar, info, archive), filter="data")
        extracted, folder = os.path.join(staging, info.folder), os.path.join(root, info.folder)
        if os.path.isdir(extracted):
            os.makedirs(folder, exist_ok=True)
            for name in os.listdir(extracted):
                os.replace(os.path.join(extracted, name), os.path.join(folder, name))
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise UserError(f"the archive {archive} is damaged or not a .tar.gz ({type(e).__name__}); delete it and "
                        f"rerun to download it again") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _bounded_members(tar: tarfile.TarFile, info: DatasetInfo, archive: str) -> list[tarfile.TarInfo]:
    """The archive's regular files and folders under the dataset's folder; a UserError past the bounds."""
    members, total = [], 0
    for member in tar:
        if not member.name.startswith(info.folder + "/") or not (member.isfile() or member.isdir()):
            continue
        members.append(member)
        total += member.size
        if len(members) > MAX_MEMBERS or total > MAX_EXTRACTED:
            raise UserError(f"the archive {archive} holds more than {MAX_MEMBERS} files or {MAX_EXTRACTED // 2**20} "
                            f"MiB under {info.folder}/, far more than {info.title}; delete it and download the "
                            f"official one")
    return members


def synthetic_split(n: int, train: bool, classes: int = len(CLASSES)) -> Split:
    """Deterministic CIFAR-shaped data that a network can learn: a fixed coarse pattern per class (8x8-pixel
    blocks, so crops and flips keep it recognisable) plus pixel noise. Class names: CIFAR-10's for 10 classes,
    CIFAR-100's fine ones for 100."""
    coarse = np.random.default_rng(10).integers(0, 256, (classes, 3, 4, 4)).astype(np.float32)
    prototypes = coarse.repeat(8, axis=2).repeat(8, axis=3)
    rng = np.random.default_rng(1 if train else 2)
    labels = rng.integers(0, classes, n)
    noise = rng.normal(0, 70, (n, 3, 32, 32)).astype(np.float32)
    images = np.clip(0.3 * prototypes[labels] + 90 + noise, 0, 255).astype(np.uint8)
    names = CLASSES if classes == len(CLASSES) else CIFAR100_CLASSES if classes == 100 else \
        tuple(f"class_{i:02d}" for i in range(classes))
    return Split(images, labels.astype(np.int64), names)


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


def augment_params(seed: int, epoch: int, index: int, pad: int = PAD, alternating: bool = False
                   ) -> tuple[int, int, bool]:
    """(dy, dx, flip) of one sample's random crop (offsets into the `pad`-padded image) and horizontal flip.
    Alternating flip: an image is flipped at random in epoch 0, then the other way round every odd epoch."""
    h = mix(seed, epoch, index)
    flip = bool((mix(seed, 0, index) >> 16) & 1) ^ bool(epoch & 1) if alternating else bool((h >> 16) & 1)
    return h % (2 * pad + 1), (h >> 8) % (2 * pad + 1), flip


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
    """uint8 images; training samples are cropped (from the padded image) and flipped as augment_params says, then
    given to `policy` (data.policy's transform, seeded by (seed, epoch, index)). with_index: each sample also says
    its index, for the batched augmentations (cifar/augment.py)."""

    def __init__(self, split: Split, augment: bool, seed: int, pad: int = PAD, alternating_flip: bool = False,
                 pad_mode: str = "zeros", policy=None, with_index: bool = False):
        self.split, self.augment, self.seed = split, augment, seed
        self.pad, self.alternating_flip, self.pad_mode = pad, alternating_flip, pad_mode
        self.policy, self.with_index = policy, with_index

    def __len__(self):
        return len(self.split)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image = self.split.images[index]
        if self.augment:
            pad = self.pad
            dy, dx, flip = augment_params(self.seed, epoch, index, pad, self.alternating_flip)
            padded = np.pad(image, ((0, 0), (pad, pad), (pad, pad)),
                            mode="reflect" if self.pad_mode == "reflect" else "constant")
            image = padded[:, dy:dy + 32, dx:dx + 32]
            if flip:
                image = image[:, :, ::-1]
        image = torch.from_numpy(np.ascontiguousarray(image))
        if self.policy is not None:
            image = aug.policy_image(self.policy, image, mix(self.seed, epoch, index, POLICY_STREAM) >> 1)
        if self.with_index:
            return image, int(self.split.labels[index]), index
        return image, int(self.split.labels[index])


def _mean_std(stats: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = STATS[stats]
    return (torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1))


def normalize(images: torch.Tensor, stats: str) -> torch.Tensor:
    """uint8 (B,3,H,W) on any device -> float32 normalised with STATS[stats]. Done after the copy: 4x fewer bytes
    to move. The same float32 operations as torchvision's ToTensor then Normalize, so the tutorial's inputs are
    reproduced bit for bit."""
    mean, std = _mean_std(stats, images.device)
    return (images.float() / 255 - mean) / std


def denormalize(images: torch.Tensor, stats: str) -> torch.Tensor:
    mean, std = _mean_std(stats, images.device)
    return (images * std + mean).clamp(0, 1)


# ----------------------------------------------------------------------------- batches for the engine

class TrainBatches(Protocol):
    stats: str                                         # the normalisation's name (STATS), for denormalize
    classes: tuple[str, ...]                           # the class names, by label
    def __len__(self) -> int: ...                      # batches per epoch on this process
    def epoch(self, epoch: int, skip: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...
    def first_images(self, n: int) -> torch.Tensor: ...  # n training images, normalised, no augmentation


class ShardSampler(Sampler):
    """Rank r of w takes samples r, r + w, ...: disjoint shards with no padding, for exact evaluation sums."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = range(rank, n, world)

    def __len__(self):
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class DataLoaderBatches:
    """Training: a torch DataLoader prepared by Accelerate, which shards it per process (no DistributedSampler of
    ours on top). Test: a disjoint shard per rank. Both normalised on the device."""

    def __init__(self, accelerator, split: Split, cfg: DataConfig, train: bool, seed: int):
        self.accelerator, self.split, self.stats = accelerator, split, cfg.normalize
        self.classes = split.classes
        cuda = accelerator.device.type == "cuda"
        # Every new iterator draws its workers' base seed from `generator`: one of the loader's own keeps the
        # global RNG (dropout, ...) the same whether or not a run was resumed, which creates its iterators elsewhere.
        workers = dict(num_workers=cfg.num_workers, pin_memory=cuda, persistent_workers=cfg.num_workers > 0,
                       prefetch_factor=4 if cfg.num_workers > 0 else None,
                       generator=torch.Generator().manual_seed(seed))
        self.batched = BatchedAugmentation(cfg, seed, split, accelerator.device) if train else None
        dataset = CifarDataset(split, cfg.augment and train, seed, cfg.crop_padding, cfg.alternating_flip,
                               cfg.pad_mode, aug.build_policy(cfg) if train else None,
                               with_index=self.batched.on if train else False)
        if train:
            self.sampler = EpochSampler(len(split), seed, shuffle=True)
            self.loader = accelerator.prepare(DataLoader(dataset, batch_size=cfg.batch_size, sampler=self.sampler,
                                                         drop_last=False, **workers))
        else:
            sampler = ShardSampler(len(split), accelerator.process_index, accelerator.num_processes)
            self.loader = DataLoader(dataset, batch_size=cfg.eval_batch_size or max(cfg.batch_size, 256),
                                     sampler=sampler, **workers)
        self.train = train

    def __len__(self):
        return len(self.loader)

    def epoch(self, epoch: int, skip: int = 0):
        if not self.train:
            device = self.accelerator.device
            for images, labels in self.loader:
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                yield normalize(images, self.stats), labels
            return
        loader = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
        # Accelerate's loader pushes its own epoch counter into the sampler when iterated: set that counter. A
        # skipping loader over a sharded one (several processes) does not reach the sampler: set it here too, or a
        # run resumed after epoch 0 would replay epoch 0's order.
        loader.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if not self.batched.on:
            for images, labels in loader:
                yield normalize(images, self.stats), labels
            return
        draws = self.batched.draws(epoch)
        for images, labels, index in loader:
            yield self.batched(normalize(images, self.stats), labels, index, draws)

    def first_images(self, n: int) -> torch.Tensor:
        return normalize(torch.from_numpy(self.split.images[:n]).to(self.accelerator.device), self.stats)


class DeviceBatches:
    """The whole split as one uint8 tensor on the device: batches by indexing, augmentation vectorised there.

    Training batches follow the same (seed, epoch) order as the DataLoader path; global batch k is
    order[k*B : (k+1)*B] with B = batch_size x processes, and rank r takes its r-th slice, so what a global step
    sees does not depend on the number of processes. The last partial global batch of an epoch is dropped (every
    rank must get a full, equal batch). Crop offsets and flips are drawn once per epoch for the whole dataset from a
    generator seeded by (seed, epoch) and indexed by sample id. Test: rank r takes samples r, r + w, ...
    """

    def __init__(self, accelerator, split: Split, cfg: DataConfig, train: bool, seed: int, accum: int = 1):
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes
        self.images = torch.from_numpy(split.images).to(self.device)
        self.labels = torch.from_numpy(split.labels).to(self.device)
        self.train, self.seed, self.stats = train, seed, cfg.normalize
        self.classes = split.classes
        self.augment = cfg.augment and train
        self.pad, self.pad_mode, self.alternating_flip = cfg.crop_padding, cfg.pad_mode, cfg.alternating_flip
        self.batch_size = cfg.batch_size if train else cfg.eval_batch_size or max(cfg.batch_size, 256)
        self.shard = torch.arange(self.rank, len(split), self.world, device=self.device)
        self.batched = BatchedAugmentation(cfg, seed, split, self.device) if train else None
        # Whole accumulation windows only: a last partial window of `accum` global batches is dropped too, so that an
        # epoch is the same optimizer steps on the same images however the global batch is split into processes and
        # micro-batches (docs/distributed.md)
        self.accum = accum if train else 1
        if train and not len(self):   # every global batch is full, so an epoch would have no step at all
            raise UserError(f"data.batch_size {cfg.batch_size} x {self.world} process(es)"
                            f"{f' x {accum} accumulated' if accum > 1 else ''} = "
                            f"{cfg.batch_size * self.world * accum} images per step, more than the training set's "
                            f"{len(split)} (data.loader=device drops a partial batch); lower data.batch_size or "
                            f"raise data.limit_train")

    def __len__(self):
        if self.train:
            return len(self.labels) // (self.batch_size * self.world * self.accum) * self.accum
        return math.ceil(len(self.shard) / self.batch_size)

    def augmentation(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(dy, dx, flip) for every training sample in this epoch, indexed by sample id."""
        n, span = len(self.labels), 2 * self.pad + 1
        g = torch.Generator().manual_seed(mix(self.seed, epoch, 1) >> 1)
        dy, dx = torch.randint(0, span, (2, n), generator=g)
        if self.alternating_flip:
            flip = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(mix(self.seed, 0, 2) >> 1))
            flip = flip.bool() ^ bool(epoch & 1)
        else:
            flip = torch.randint(0, 2, (n,), generator=g).bool()
        return dy.to(self.device), dx.to(self.device), flip.to(self.device)

    def epoch(self, epoch: int, skip: int = 0):
        if not self.train:
            for k in range(len(self)):
                idx = self.shard[k * self.batch_size:(k + 1) * self.batch_size]
                yield normalize(self.images[idx], self.stats), self.labels[idx]
            return
        order = epoch_order(len(self.labels), self.seed, epoch).to(self.device)
        params = self.augmentation(epoch) if self.augment else None
        draws = self.batched.draws(epoch) if self.batched.on else None
        step = self.batch_size * self.world
        for k in range(skip, len(self)):
            idx = order[k * step + self.rank * self.batch_size:k * step + (self.rank + 1) * self.batch_size]
            images = self.images[idx]
            if params is not None:
                images = crop_flip(images, *(p[idx] for p in params), self.pad, self.pad_mode)
            if draws is None:
                yield normalize(images, self.stats), self.labels[idx]
            else:
                yield self.batched(normalize(images, self.stats), self.labels[idx], idx, draws)

    def first_images(self, n: int) -> torch.Tensor:
        return normalize(self.images[:n], self.stats)


class BatchedAugmentation:
    """data.erasing, data.cutout, data.mixup_alpha and data.cutmix_alpha on the device, for either loader: one
    epoch's draws for every training sample (seeded by (seed, epoch)), applied to a normalised batch by its samples'
    indices. `on`: whether the config asks for any."""

    def __init__(self, cfg: DataConfig, seed: int, split: Split, device):
        self.cfg, self.seed, self.n, self.device = cfg, seed, len(split), device
        self.classes, self.on = len(split.classes), aug.batch_ops(cfg)

    def draws(self, epoch: int) -> aug.Draws:
        return aug.epoch_draws(self.cfg, mix(self.seed, epoch, BATCH_STREAM) >> 1, self.n).to(self.device)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, draws: aug.Draws):
        return aug.apply_batch(images, labels, index, draws, self.classes)


def crop_flip(images: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor, pad: int,
              pad_mode: str = "zeros") -> torch.Tensor:
    """Per-image 32x32 crop at (dy, dx) of the batch padded by `pad`, mirrored where flip: one gather. Reflect
    padding is done on the indices (uint8 tensors have no reflection pad, and no padded copy is needed)."""
    b, c, h, w = images.shape
    ar = torch.arange(h, device=images.device)
    rows = dy[:, None] + ar - pad                                      # (B, H) rows of the unpadded image
    cols = dx[:, None] + ar - pad
    cols = torch.where(flip[:, None], cols.flip(1), cols)              # (B, W)
    if pad_mode == "reflect":
        rows, cols = _reflect(rows, h), _reflect(cols, w)
    else:
        images, rows, cols = torch.nn.functional.pad(images, (pad, pad, pad, pad)), rows + pad, cols + pad
    out = images[torch.arange(b, device=images.device)[:, None, None], :, rows[:, :, None], cols[:, None, :]]
    return out.permute(0, 3, 1, 2)                                     # (B, H, W, C) -> (B, C, H, W)


def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices outside 0..n-1 mirrored about the edge pixel (-1 -> 1, n -> n - 2), as reflect padding does."""
    return (n - 1) - ((n - 1) - i.abs()).abs()


def build_batches(accelerator, cfg: DataConfig, seed: int, accum: int = 1):
    """(train, test) batches; the main process reads (or downloads) first, the others wait for it. accum: the
    micro-batches of an optimizer step (the device path drops the epoch's last partial window)."""
    if cfg.source != "synthetic" and not cfg.download:
        prepare(cfg)                     # every rank can fail fast (and alike) without waiting for the others
    with accelerator.main_process_first():
        prepare(cfg)
        train, test = load_split(cfg, train=True), load_split(cfg, train=False)
    kind = DeviceBatches if cfg.loader == "device" else DataLoaderBatches
    window = {"accum": accum} if kind is DeviceBatches else {}
    return kind(accelerator, train, cfg, True, seed, **window), kind(accelerator, test, cfg, False, seed)
