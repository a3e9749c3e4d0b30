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
    top_k: int | None = None         # k of top_k_accuracy; None: not counted
    top_k_accuracy: float | None = None   # percent of images whose label is among the k highest logits

    def as_row(self, prefix: str = "test/") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.accuracy, **self.top_k_entry(f"{prefix}acc"),
                f"{prefix}per_class": self.per_class, f"{prefix}count": self.count}

    def top_k_entry(self, name: str) -> dict:
        """{name_top5: the top-5 accuracy} wherever the top-1 one is `name`; {} when top-k was not counted."""
        return {f"{name}_top{self.top_k}": self.top_k_accuracy} if self.top_k else {}


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
def evaluate(model, batches, accelerator, tta: str = "none", samples: int = 0, top_k: int | None = None
             ) -> EvalResult:
    """Each rank runs its own disjoint shard of the test set (no padding, no duplicates) through the plain model
    (no DDP collectives on the way); the confusion matrix, loss and top-k sums are then all-reduced, so every image
    counts exactly once whatever the world size. samples > 0 keeps that many of this rank's first images and
    predictions. top_k: also count the images whose label is among the k highest logits (k at most the number of
    classes). The classes are the batches' (batches.classes: their names by label)."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    classes = batches.classes
    n = len(classes)
    confusion = torch.zeros(n * n, dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    top_k_hits = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    k = min(top_k or 1, n)
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
        if top_k:
            top_k_hits += (logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum().double()
    net.train(was_training)
    totals = accelerator.reduce(torch.cat([confusion, top_k_hits, loss_sum]), "sum")
    confusion = totals[:-2].round().long().view(n, n).cpu()
    total = int(confusion.sum())
    per_class = (100.0 * confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    return EvalResult(loss=float(totals[-1]) / max(total, 1),
                      accuracy=100.0 * float(confusion.diag().sum()) / max(total, 1),
                      per_class=dict(zip(classes, per_class)),
                      confusion=confusion.tolist(), count=total, samples=kept, top_k=top_k,
                      top_k_accuracy=100.0 * float(totals[-2]) / max(total, 1) if top_k else None)
