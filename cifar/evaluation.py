"""Exact distributed evaluation: every test image counted once, whatever the world size."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import denormalize


@dataclass
class EvalResult:
    loss: float
    accuracy: float                  # percent
    per_class: dict[str, float]      # percent, by class name, every class in label order
    confusion: list[list[int]]       # [true][predicted]
    count: int
    samples: tuple | None = None     # (images in [0, 1] as numpy, labels, predictions) of a few test images

    def as_row(self, prefix: str = "test/") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.accuracy, f"{prefix}per_class": self.per_class,
                f"{prefix}count": self.count}


def predict(model, images: torch.Tensor, tta: str = "none") -> torch.Tensor:
    """Logits, averaged over test-time views: flip = the image and its mirror; flip_translate = those two (weight
    1/2) and both shifted one pixel up-left and down-right (weight 1/2 together)."""
    def run(x):    # a float32 copy: under CUDA graphs the next call reuses the memory of this call's output
        return model(x).to(torch.float32, copy=True)

    logits = run(images)
    if tta == "none":
        return logits
    mirrored = images.flip(-1)
    logits = (logits + run(mirrored)) / 2
    if tta == "flip_translate":
        h, w = images.shape[-2:]
        shifted = []
        for view in (images, mirrored):
            padded = F.pad(view, (1, 1, 1, 1), mode="reflect")
            # contiguous: a compiled model would otherwise compile again for the views' strides
            shifted += [run(padded[..., :h, :w].contiguous()), run(padded[..., 2:, 2:].contiguous())]
        logits = (logits + sum(shifted) / len(shifted)) / 2
    return logits


@torch.no_grad()
def evaluate(model, batches, accelerator, tta: str = "none", samples: int = 0) -> EvalResult:
    """Each rank runs its own disjoint shard of the test set (no padding, no duplicates) through the plain model
    (no DDP collectives on the way); the confusion matrix and loss sums are then all-reduced, so every image counts
    exactly once whatever the world size. samples > 0 keeps that many of this rank's first images and predictions.
    The classes are the batches' (batches.classes: their names by label)."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    classes = batches.classes
    n = len(classes)
    confusion = torch.zeros(n * n, dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    kept = None
    for images, labels in batches.epoch(0):
        with accelerator.autocast():
            logits = predict(net, images, tta)
        preds = logits.argmax(1)
        if samples and kept is None:
            kept = (denormalize(images[:samples], batches.stats).float().cpu().numpy(), labels[:samples].tolist(),
                    preds[:samples].tolist())
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double()
        confusion += torch.bincount(labels * n + preds, minlength=n * n).double()
    net.train(was_training)
    totals = accelerator.reduce(torch.cat([confusion, loss_sum]), "sum")
    confusion = totals[:-1].round().long().view(n, n).cpu()
    total = int(confusion.sum())
    per_class = (100.0 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return EvalResult(loss=float(totals[-1]) / max(total, 1),
                      accuracy=100.0 * float(confusion.diag().sum()) / max(total, 1),
                      per_class=dict(zip(classes, per_class)),
                      confusion=confusion.tolist(), count=total, samples=kept)
