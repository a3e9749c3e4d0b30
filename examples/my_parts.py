"""A model, an optimizer, an LR schedule and an augmentation policy of one's own, nothing in cifar/ edited
(docs/extending.md):

    python train.py --config configs/debug.yaml model.name=examples.my_parts:small_cnn \
        optim.name=examples.my_parts:rmsprop schedule.name=examples.my_parts:exponential
    python train.py --config configs/debug.yaml data.policy=examples.my_parts:jitter
"""
import torch
import torch.nn as nn
from torchvision.transforms import v2


def small_cnn(num_classes):
    """A model: called with the dataset's number of classes, returns the network."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(64, num_classes))


def rmsprop(groups, cfg):
    """An optimizer: the parameter groups to optimize as they are, and the config's optim section."""
    return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def exponential(progress):
    """A schedule: the factor of optim.lr at `progress` (0 at the first step after the warmup, 1 at the last)."""
    return 0.01 ** progress


def jitter(cfg):
    """An augmentation policy: called with the config's data section, returns a transform of one uint8 image
    (3, 32, 32) that draws from torch's random generator (the loader seeds it per image)."""
    return v2.Compose([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4), v2.RandomGrayscale(p=0.1)])
