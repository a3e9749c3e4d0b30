"""Augmentation beyond crop and flip: a per-image policy (the POLICIES registry: torchvision.transforms.v2's
AutoAugment with its CIFAR-10 policy, RandAugment, TrivialAugmentWide, or one's own), random erasing and Cutout,
MixUp and CutMix.

Every random number is a function of (seed, epoch, sample index), never of the batch layout, so that 2 processes x
batch b train as 1 process x 2b does:
- a policy runs per image (the DataLoader's workers) on torch's CPU generator seeded by (seed, epoch, index) and put
  back afterwards (policy_image);
- erasing, Cutout, MixUp and CutMix run on whole batches on the device, after normalisation, on both loaders: their
  random numbers are drawn once per epoch for every sample (epoch_draws, indexed by sample id);
- MixUp and CutMix mix each image with its neighbour in the batch, positions 2i and 2i+1, both with the first one's
  lambda: a pair never straddles two ranks' micro-batches when data.batch_size is even (config.py requires it), and
  the global batch k is the ranks' micro-batches side by side, so the pairs are the same in every layout.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from .errors import UserError
from .registry import Registry

# data.policy: a builder(cfg) gets the data config section and returns a callable that takes one uint8 image tensor
# (3, 32, 32) and returns one (or None: no policy). Its randomness must come from torch's global generator (as
# torchvision's transforms' does): policy_image seeds that per image.
POLICIES = Registry("augmentation policy", "data.policy")


@POLICIES.register("none")
def no_policy(cfg) -> None:
    return None


def _v2():
    """torchvision.transforms.v2, imported by the policies that use it only: importing torchvision adds about 2 s to
    every process start (train.py, each DDP rank, each sweep run), and most runs use no policy."""
    from torchvision.transforms import v2
    return v2


@POLICIES.register("autoaugment")
def autoaugment(cfg) -> Callable:
    """AutoAugment's policy learned on CIFAR-10 (Cubuk et al. 2019): 25 sub-policies of two operations each."""
    v2 = _v2()
    return v2.AutoAugment(v2.AutoAugmentPolicy.CIFAR10)


@POLICIES.register("randaugment")
def randaugment(cfg) -> Callable:
    """RandAugment (Cubuk et al. 2020): 2 operations at magnitude 9 of 31, torchvision's defaults."""
    return _v2().RandAugment()


@POLICIES.register("trivialaugment")
def trivialaugment(cfg) -> Callable:
    """TrivialAugment Wide (Mueller and Hutter 2021): one operation at a random magnitude; no parameters."""
    return _v2().TrivialAugmentWide()


def build_policy(cfg) -> Optional[Callable]:
    """The transform data.policy names (None for none), checked on a blank image: a callable of one's own that does
    not return a uint8 image of the same shape is one line here, before any work, not an error in a worker."""
    transform = POLICIES[cfg.policy](cfg)
    if transform is None:
        return None
    if not callable(transform):
        raise UserError(f"data.policy={cfg.policy} returned a {type(transform).__name__}, not a callable on an "
                        f"image; return e.g. a torchvision.transforms.v2 transform (docs/extending.md)")
    out = transform(torch.zeros(3, 32, 32, dtype=torch.uint8))
    if not (isinstance(out, torch.Tensor) and out.dtype == torch.uint8 and out.shape == (3, 32, 32)):
        what = (f"a {out.dtype} tensor of shape {list(out.shape)}" if isinstance(out, torch.Tensor)
                else f"a {type(out).__name__}")
        raise UserError(f"data.policy={cfg.policy}: its transform turned a uint8 image (3, 32, 32) into {what}; "
                        f"it must return a uint8 image of the same shape")
    return transform


def policy_image(transform: Callable, image: torch.Tensor, seed: int) -> torch.Tensor:
    """transform(image) with torch's CPU generator seeded by `seed` (a hash of seed, epoch and index) and restored
    afterwards: the image's augmentation is the same in any worker and any layout, and the global random stream
    (dropout) is untouched. Only the CPU generator is seeded (torch.manual_seed would reseed CUDA's too)."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return transform(image)


# ----------------------------------------------------------------------------- batched: erasing, Cutout, mixing

# torchvision's RandomErasing defaults: the rectangle's share of the image and its aspect ratio (h / w), and the
# attempts at a rectangle that fits before the image is left as it is
ERASE_SCALE, ERASE_RATIO, ERASE_ATTEMPTS = (0.02, 1 / 3), (0.3, 3.3), 10


def batch_ops(cfg) -> bool:
    """Whether the config asks for any of the batched augmentations (they need each sample's index)."""
    return cfg.erasing > 0 or cfg.cutout > 0 or mixing(cfg)


def mixing(cfg) -> bool:
    return cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0


@dataclass
class Draws:
    """One epoch's random numbers of the batched augmentations, for every sample, indexed by sample id."""
    erase: Optional[torch.Tensor]    # (n, 4) int64: y0, y1, x0, x1 of the erased rectangle (y0 == y1: none)
    cutout: Optional[torch.Tensor]   # (n, 4) int64: the Cutout square, cut at the borders
    lam: Optional[torch.Tensor]      # (n,) float32: the pair's lambda when the sample is a pair's first
    cut: Optional[torch.Tensor]      # (n,) bool: CutMix (else MixUp) for the pair the sample leads
    centre: Optional[torch.Tensor]   # (n, 2) int64: the CutMix box's centre (y, x)

    def to(self, device) -> "Draws":
        return Draws(*(None if t is None else t.to(device) for t in (self.erase, self.cutout, self.lam, self.cut,
                                                                     self.centre)))


def epoch_draws(cfg, seed: int, n: int, size: int = 32) -> Draws:
    """Draws for n samples of size x size images, from numpy's generator seeded by `seed` (a hash of the run's seed
    and the epoch): the same numbers on every rank, on both loaders."""
    rng = np.random.default_rng(seed)
    erase = cutout = lam = cut = centre = None
    if cfg.erasing > 0:
        erase = _erase_boxes(rng, n, size, cfg.erasing)
    if cfg.cutout > 0:
        cy, cx = rng.integers(0, size, (2, n))
        y0, x0 = np.clip(cy - cfg.cutout // 2, 0, size), np.clip(cx - cfg.cutout // 2, 0, size)
        y1, x1 = np.clip(cy - cfg.cutout // 2 + cfg.cutout, 0, size), np.clip(cx - cfg.cutout // 2 + cfg.cutout, 0,
                                                                               size)
        cutout = torch.from_numpy(np.stack([y0, y1, x0, x1], 1))
    if mixing(cfg):
        cut = rng.random(n) < 0.5 if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0 else \
            np.full(n, cfg.cutmix_alpha > 0)
        alpha = np.where(cut, cfg.cutmix_alpha, cfg.mixup_alpha)
        lam = rng.beta(alpha, alpha)
        centre = torch.from_numpy(rng.integers(0, size, (n, 2)))
        lam, cut = torch.from_numpy(lam.astype(np.float32)), torch.from_numpy(cut)
    return Draws(erase, cutout, lam, cut, centre)


def _erase_boxes(rng: np.random.Generator, n: int, size: int, p: float) -> torch.Tensor:
    """torchvision's RandomErasing.get_params for n images at once: the first of ERASE_ATTEMPTS rectangles that fits
    (none fitting: nothing erased), each image erased with probability p."""
    area = size * size * rng.uniform(*ERASE_SCALE, (n, ERASE_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ERASE_RATIO[0]), math.log(ERASE_RATIO[1]), (n, ERASE_ATTEMPTS)))
    h, w = np.rint(np.sqrt(area * aspect)).astype(np.int64), np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h < size) & (w < size)
    first = fits.argmax(1)
    rows = np.arange(n)
    h, w = h[rows, first], w[rows, first]
    y0 = (rng.random(n) * (size - h + 1)).astype(np.int64)
    x0 = (rng.random(n) * (size - w + 1)).astype(np.int64)
    on = (rng.random(n) < p) & fits.any(1)
    h, w = np.where(on, h, 0), np.where(on, w, 0)
    return torch.from_numpy(np.stack([y0, y0 + h, x0, x0 + w], 1))


def _in_boxes(boxes: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, 1, h, w) bool: the pixels inside each image's box (y0, y1, x0, x1)."""
    rows = torch.arange(h, device=boxes.device).view(1, h, 1)
    cols = torch.arange(w, device=boxes.device).view(1, 1, w)
    y0, y1, x0, x1 = (boxes[:, k].view(-1, 1, 1) for k in range(4))
    return ((rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)).unsqueeze(1)


def apply_batch(images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor, draws: Draws,
                num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Erasing and Cutout (the boxes set to 0: the mean, after normalisation), then MixUp/CutMix of the pairs
    (positions 2i, 2i+1; an odd batch's last image is its own partner, unchanged). Labels stay class indices
    without mixing; with it they become soft targets (B, num_classes) that CrossEntropyLoss takes as they are."""
    b, _, h, w = images.shape
    for boxes in (draws.erase, draws.cutout):
        if boxes is not None:
            images = images.masked_fill(_in_boxes(boxes[index], h, w), 0.0)
    if draws.lam is None:
        return images, labels
    pos = torch.arange(b, device=images.device)
    partner = torch.where(pos < b - b % 2, pos ^ 1, pos)
    lead = index[pos - pos % 2]                              # each pair's first sample: its draws are the pair's
    lam, cut = draws.lam[lead], draws.cut[lead]
    cut_ratio = (1 - lam).sqrt()
    ch, cw = (h * cut_ratio).long(), (w * cut_ratio).long()
    cy, cx = draws.centre[lead, 0], draws.centre[lead, 1]
    box = torch.stack([(cy - ch // 2).clamp(0, h), (cy + ch // 2).clamp(0, h),
                       (cx - cw // 2).clamp(0, w), (cx + cw // 2).clamp(0, w)], 1)
    # CutMix's lambda is the share of the image left after the box is cut at the borders (timm's correct_lam)
    cut_lam = 1 - ((box[:, 1] - box[:, 0]) * (box[:, 3] - box[:, 2])).float() / (h * w)
    lam = torch.where(cut, cut_lam, lam)
    other = images[partner]
    l4 = lam.view(-1, 1, 1, 1).to(images.dtype)
    blended = images * l4 + other * (1 - l4)
    pasted = torch.where(_in_boxes(box, h, w), other, images)
    mixed = torch.where(cut.view(-1, 1, 1, 1), pasted, blended)
    onehot = torch.nn.functional.one_hot(labels, num_classes).float()
    targets = onehot * lam[:, None] + onehot[partner] * (1 - lam[:, None])
    return mixed, targets
