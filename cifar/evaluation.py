"""Exact distributed evaluation: every test image counted once, whatever the world size."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import CLASSES, denormalize


@dataclass
class EvalResult:
    loss: float
    accuracy: float                  # percent
    per_class: dict[str, float]      # percent, by class name
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
    exactly once whatever the world size. samples > 0 keeps that many of this rank's first images and predictions."""
    net = accelerator.unwrap_model(model)
    was_training = net.training
    net.eval()
    n = len(CLASSES)
    confusion = torch.zeros(n * n, dtype=torch.float64, device=accelerator.device)
    loss_sum = torch.zeros(1, dtype=torch.float64, device=accelerator.device)
    kept = None
    for images, labels in batches.epoch(0):
        with accelerator.autocast():
            logits = predict(net, images, tta)
        preds = logits.argmax(1)
        if samples and kept is None:
            kept = (denormalize(images[:samples]).float().cpu().numpy(), labels[:samples].tolist(),
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
                      per_class=dict(zip(CLASSES, per_class)),
                      confusion=confusion.tolist(), count=total, samples=kept)


# ----------------------------------------------------------------------------- evaluate.py

def find_run_files(path: str, pick: str = "auto") -> tuple[str, str]:
    """(config.yaml, weights) for a checkpoint folder, a weights file, or a run folder. In a run folder, `pick`
    chooses the final weights, the `latest` or the `best` checkpoint; auto means final if the run finished, else
    latest."""
    import os

    from .checkpoint import read_pointer
    from .errors import UserError
    from .outputs import WEIGHTS

    path = os.path.abspath(path)
    folder = os.path.dirname(path) if os.path.isfile(path) else path
    checkpoints = os.path.join(folder, "checkpoints")
    if os.path.isdir(folder) and not os.path.isfile(path):
        if pick in ("latest", "best") or (pick == "auto" and not os.path.isfile(os.path.join(folder, WEIGHTS))):
            target = read_pointer(checkpoints, "latest" if pick == "auto" else pick)
            if target is None and pick != "auto":
                raise UserError(f"{folder} has no '{pick}' checkpoint; use --pick final or latest")
            folder = target or folder
    weights, config = os.path.join(folder, WEIGHTS), os.path.join(folder, "config.yaml")
    if not os.path.isfile(weights) or not os.path.isfile(config):
        raise UserError(f"no weights at {path} (need {WEIGHTS} and config.yaml); pass a run folder written by "
                        f"train.py (runs/<name>-<time>) or one of its checkpoints/step-<N> folders")
    return config, weights


def _trained_run(weights: str) -> tuple[str | None, int | None]:
    """(W&B run id, global step) of the training that produced these weights, when it says."""
    import json
    import os

    folder = os.path.dirname(weights)
    for name, pick in (("state.json", lambda d: d["state"]), ("summary.json", lambda d: d)):
        try:
            with open(os.path.join(folder, name)) as f:
                record = pick(json.load(f))
            return record.get("wandb_run_id"), record.get("step", record.get("steps"))
        except (OSError, ValueError, KeyError):
            continue
    return None, None


def run_evaluation(checkpoint: str, overrides: list[str], tta: str, output_dir: str | None,
                   preview: int = 16, pick: str = "auto", into_train_run: bool = False) -> dict:
    """evaluate.py: exact accuracy on the test split, a report and two PNGs, and, when W&B is on, an eval run
    (job_type eval, in the recipe's group) or, with into_train_run, the training run itself."""
    import os

    from .config import load_config
    from .data import build_batches
    from .engine import make_accelerator
    from .models import build_model
    from .outputs import load_weights, to_json, write_atomic
    from .plots import confusion_png, predictions_png
    from .tracking import Tracker, run_info

    config_path, weights = find_run_files(checkpoint, pick)
    cfg = load_config(config_path, overrides)
    accelerator = make_accelerator(cfg)
    model = build_model(cfg.model.name)
    load_weights(model, weights)
    _, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    model = accelerator.prepare(model)
    result = evaluate(model, test_batches, accelerator, tta=tta, samples=preview)
    run_id, step = _trained_run(weights)
    report = {"checkpoint": weights, "step": step, "tta": tta, "world_size": accelerator.num_processes,
              "accuracy": result.accuracy, "loss": result.loss, "count": result.count,
              "per_class": result.per_class, "confusion": result.confusion}
    if accelerator.is_main_process:
        out = output_dir or os.path.dirname(weights)
        os.makedirs(out, exist_ok=True)
        print(f"Accuracy of the network on the {result.count} test images: {result.accuracy:.2f} %")
        for name, acc in result.per_class.items():
            print(f"Accuracy of {name:>5s} : {acc:5.1f} %")
        write_atomic(os.path.join(out, "eval.json"), (to_json(report) + "\n").encode())
        title = f"{cfg.name}: {result.accuracy:.2f}% on {result.count} test images" + (
            f" ({tta} TTA)" if tta != "none" else "")
        confusion_png(result.confusion, os.path.join(out, "confusion.png"), title)
        predictions_png(*result.samples, os.path.join(out, "predictions.png"))
        print(f"wrote {out}/eval.json, confusion.png, predictions.png")
        report["output_dir"] = out

        tracker = Tracker.start(cfg, output_dir=out, enabled=True, job_type="eval",
                                run_id=run_id if into_train_run else None, extra=run_info(cfg, accelerator))
        prefix = "eval/" if tta == "none" else f"eval_{tta}/"
        tracker.log({"step": step or 0, **result.as_row(prefix), f"{prefix}checkpoint": weights})
        tracker.log_eval(step or 0, result.confusion, *result.samples)
        tracker.summary({f"{prefix}acc": result.accuracy, f"{prefix}loss": result.loss})
        tracker.finish(0)
    # Ranks tear the process group down together: a rank that leaves while another still uses it can abort
    # ("terminate called without an active exception") instead of exiting cleanly.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return report
