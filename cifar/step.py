"""One optimizer step over a window of micro-batches, and the running sums it adds to."""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch

from .errors import Diverged


@dataclass
class StepStats:
    """Running sums on the device (two in-place ops a step), read with one sync when a row is logged or a
    checkpoint saved."""
    loss_sum: torch.Tensor     # float64
    correct: torch.Tensor      # int64
    samples: int

    @classmethod
    def start(cls, device, sums=(0.0, 0, 0), mine: bool = True):
        """Counters beginning at `sums` (global totals restored from a checkpoint) on one rank, zero elsewhere."""
        loss, correct, samples = sums if mine else (0.0, 0, 0)
        return cls(torch.tensor(float(loss), device=device, dtype=torch.float64),
                   torch.tensor(int(correct), device=device, dtype=torch.long), int(samples))

    def add(self, loss_sum, correct, n):
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += n

    def totals(self, accelerator) -> list:
        """[loss sum, correct, samples] over all ranks; raises when training has diverged."""
        local = torch.stack([self.loss_sum, self.correct.double(),
                             torch.tensor(float(self.samples), device=self.loss_sum.device, dtype=torch.float64)])
        loss_sum, correct, samples = accelerator.reduce(local, "sum").tolist()
        if not math.isfinite(loss_sum):
            raise Diverged(f"training diverged: the loss became {loss_sum}; lower optim.lr or set train.grad_clip "
                            f"(the last good checkpoint is kept)")
        return [loss_sum, int(correct), int(samples)]


def train_loss(label_smoothing: float) -> torch.nn.Module:
    """The training loss, summed over the batch (train_step divides by the window's images). Class indices, or the
    soft targets of MixUp/CutMix batches (data.mixup_alpha: a distribution over the classes per image), which
    CrossEntropyLoss takes as they are and smooths as it does indices, (1 - s) * target + s / classes: timm's
    mixup_target with smoothing, so train.label_smoothing means the same with and without mixing."""
    return torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=label_smoothing)


def train_step(accelerator, model, optimizer, loss_fn, window, grad_clip) -> tuple[torch.Tensor, torch.Tensor,
                                                                                int, float | None, bool]:
    """One optimizer step over a window of micro-batches: (loss sum, correct, images, grad norm, stepped).

    Each micro-batch's summed loss is divided by the window's real sample count, so a short last window of an
    epoch weighs each sample exactly as a full one does. DDP averages over ranks, which Accelerate keeps at equal
    batch sizes. Gradients synchronise only on the window's last micro-batch.
    """
    n = sum(len(labels) for _, labels in window)
    loss_total = correct = None
    for i, (images, labels) in enumerate(window):
        last = i == len(window) - 1
        with accelerator.no_sync(model) if not last else contextlib.nullcontext():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
            if accelerator.scaler is not None:
                accelerator.backward(loss / n)       # fp16: scaled by Accelerate's grad scaler
            else:
                (loss / n).backward()                # what accelerator.backward does here, minus a no-op /1
        # soft targets (MixUp/CutMix: a distribution over the classes) count as their largest class
        hits = (logits.argmax(1) == (labels.argmax(1) if labels.ndim == 2 else labels)).sum()
        loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        correct = hits if correct is None else correct + hits
    grad_norm = None
    if grad_clip is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip))
    if accelerator.scaler is not None:       # fp16: Accelerate's optimizer wrapper drives the grad scaler
        optimizer.step()
        stepped = not optimizer.step_was_skipped
    else:                                    # the plain optimizer: the wrapper's per-step bookkeeping costs ~10%
        optimizer.optimizer.step()           # of a small model's step, and gradient sync is ours to manage
        stepped = True
    optimizer.optimizer.zero_grad(set_to_none=True)
    return loss_total, correct, n, grad_norm, stepped


def feed(batches, waited: list, channels_last: bool):
    """The batches, with the time spent waiting for each added to waited[0] (a starved GPU shows here)."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            return
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        waited[0] += time.perf_counter() - start
        yield images, labels


def windows(batches, size: int):
    """Group an epoch's micro-batches into accumulation windows; the last one may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window
