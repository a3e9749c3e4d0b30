"""Exact distributed evaluation: every test image counted once, whatever the world size."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import CLASSES


@dataclass
class EvalResult:
    loss: float
    accuracy: float                  # percent
    per_class: dict[str, float]      # percent, by class name
    confusion: list[list[int]]       # [true][predicted]
    count: int

    def as_row(self, prefix: str = "test/") -> dict:
        return {f"{prefix}loss": self.loss, f"{prefix}acc": self.accuracy, f"{prefix}per_class": self.per_class,
                f"{prefix}count": self.count}


def predict(model, images: torch.Tensor, tta: bool) -> torch.Tensor:
    """Logits; with tta, the mean of the image and its horizontal mirror."""
    logits = model(images).float()
    if tta:
        logits = (logits + model(images.flip(-1)).float()) / 2
    return logits


@torch.no_grad()
def evaluate(model, batches, accelerator, tta: bool = False) -> EvalResult:
    was_training = model.training
    model.eval()
    n = len(CLASSES)
    confusion = torch.zeros(n * n, dtype=torch.long, device=accelerator.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    for images, labels in batches.epoch(0):
        logits = predict(model, images, tta)
        losses = F.cross_entropy(logits, labels, reduction="none")
        # gather_for_metrics drops the samples Accelerate repeated to even out the last batch across ranks
        losses, preds, labels = accelerator.gather_for_metrics((losses, logits.argmax(1), labels))
        confusion += torch.bincount(labels * n + preds, minlength=n * n)
        loss_sum += losses.double().sum()
    model.train(was_training)
    confusion = confusion.view(n, n).cpu()
    total = int(confusion.sum())
    per_class_total = confusion.sum(1).clamp(min=1)
    per_class = (100.0 * confusion.diag() / per_class_total).tolist()
    return EvalResult(loss=float(loss_sum) / max(total, 1),
                      accuracy=100.0 * float(confusion.diag().sum()) / max(total, 1),
                      per_class=dict(zip(CLASSES, per_class)),
                      confusion=confusion.tolist(), count=total)


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


def run_evaluation(checkpoint: str, overrides: list[str], tta: bool, output_dir: str | None,
                   preview: int = 16, pick: str = "auto") -> dict:
    import os

    from .config import load_config
    from .data import build_batches, denormalize, load_split, normalize
    from .engine import make_accelerator
    from .models import build_model
    from .outputs import load_weights, to_json, write_atomic
    from .plots import confusion_png, predictions_png

    config_path, weights = find_run_files(checkpoint, pick)
    cfg = load_config(config_path, overrides)
    accelerator = make_accelerator(cfg)
    model = build_model(cfg.model.name)
    load_weights(model, weights)
    _, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    model = accelerator.prepare(model)
    result = evaluate(model, test_batches, accelerator, tta=tta)
    report = {"checkpoint": weights, "tta": tta, "world_size": accelerator.num_processes,
              "accuracy": result.accuracy, "loss": result.loss, "count": result.count,
              "per_class": result.per_class, "confusion": result.confusion}
    if accelerator.is_main_process:
        out = output_dir or os.path.dirname(weights)
        os.makedirs(out, exist_ok=True)
        print(f"Accuracy of the network on the {result.count} test images: {result.accuracy:.2f} %")
        for name, acc in result.per_class.items():
            print(f"Accuracy of {name:>5s} : {acc:5.1f} %")
        write_atomic(os.path.join(out, "eval.json"), (to_json(report) + "\n").encode())
        confusion_png(result.confusion, os.path.join(out, "confusion.png"),
                      f"{cfg.name}: {result.accuracy:.2f}% on {result.count} test images" + (" (flip TTA)" if tta
                                                                                                  else ""))
        split = load_split(cfg.data, train=False)
        images = torch.from_numpy(split.images[:preview]).to(accelerator.device)
        with torch.no_grad():
            raw = accelerator.unwrap_model(model).eval()
            preds = predict(raw, normalize(images), tta).argmax(1).cpu().tolist()
        shown = denormalize(normalize(images)).cpu().numpy()
        predictions_png(shown, split.labels[:preview].tolist(), preds, os.path.join(out, "predictions.png"))
        print(f"wrote {out}/eval.json, confusion.png, predictions.png")
        report["output_dir"] = out
    accelerator.end_training()
    return report
