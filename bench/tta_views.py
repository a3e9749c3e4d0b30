"""Test accuracy of trained runs under other test-time augmentations than the recipe's, from the same weights.

    python bench/tta_views.py RUN_DIR [RUN_DIR ...] [key=value ...]

Each run's test logits are computed once for 18 views (the image and its mirror, each shifted by -1, 0, +1 pixels
in y and x with reflect padding), then combined in several ways. `flip_translate` is the recipe's TTA (6 views) and
must match what the run's summary.json reports. Evaluation time grows with the number of views; training time does
not change.
"""
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cifar.config import load_saved_config  # noqa: E402
from cifar.data import build_batches, num_classes                  # noqa: E402
from cifar.checkpoint import WEIGHTS                  # noqa: E402
from cifar.files import load_weights                  # noqa: E402
from cifar.models import model_from_config                  # noqa: E402
from cifar.runtime import make_accelerator            # noqa: E402

SHIFTS = (-1, 0, 1)


def mean(views):
    return sum(views) / len(views)


# name -> (number of views, how to combine v[flip][dy][dx], where dy, dx index SHIFTS)
SCHEMES = {
    "none": (1, lambda v: v[0][1][1]),
    "flip": (2, lambda v: mean([v[f][1][1] for f in (0, 1)])),
    "flip_translate": (6, lambda v: (mean([v[f][1][1] for f in (0, 1)])
                                     + mean([v[f][i][i] for f in (0, 1) for i in (0, 2)])) / 2),
    "axis shifts, 10 equal": (10, lambda v: mean([v[f][i][j] for f in (0, 1)
                                                  for i, j in ((1, 1), (0, 1), (2, 1), (1, 0), (1, 2))])),
    "diagonal shifts, 10": (10, lambda v: (mean([v[f][1][1] for f in (0, 1)])
                                           + mean([v[f][i][j] for f in (0, 1) for i in (0, 2) for j in (0, 2)])) / 2),
    "all 18 equal": (18, lambda v: mean([v[f][i][j] for f in (0, 1) for i in range(3) for j in range(3)])),
}


@torch.no_grad()
def view_logits(run_dir: str, overrides: list[str]):
    cfg = load_saved_config(os.path.join(run_dir, "config.yaml"), overrides)
    accelerator = make_accelerator(cfg)
    model = model_from_config(cfg.model, num_classes(cfg.data))
    load_weights(model, os.path.join(run_dir, WEIGHTS), "pass runs trained by this project")
    model.eval()
    _, test = build_batches(accelerator, cfg.data, cfg.seed)
    chunks, labels = [], []
    for images, y in test.epoch(0):
        h, w = images.shape[-2:]
        per_flip = []
        for x in (images, images.flip(-1)):
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            per_flip.append([[model(padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w].contiguous()).float()
                              for dx in SHIFTS] for dy in SHIFTS])
        chunks.append(per_flip)
        labels.append(y)
    views = [[[torch.cat([c[f][i][j] for c in chunks]) for j in range(3)] for i in range(3)] for f in range(2)]
    return views, torch.cat(labels)


def main():
    runs = [a for a in sys.argv[1:] if "=" not in a]
    overrides = [a for a in sys.argv[1:] if "=" in a]
    table = {name: [] for name in SCHEMES}
    for run_dir in runs:
        views, labels = view_logits(run_dir, overrides)
        for name, (_, combine) in SCHEMES.items():
            table[name].append(100.0 * float((combine(views).argmax(1) == labels).float().mean()))
        print(f"{run_dir}: flip_translate {table['flip_translate'][-1]:.2f}%", flush=True)
    base = statistics.mean(table["flip_translate"])
    print(f"{'scheme':24s} {'views':>5s} {'mean %':>7s} {'vs recipe':>9s}  per run")
    for name, (n, _) in SCHEMES.items():
        accs = table[name]
        print(f"{name:24s} {n:5d} {statistics.mean(accs):7.3f} {statistics.mean(accs) - base:+9.3f}  "
              + " ".join(f"{a:.2f}" for a in accs))


if __name__ == "__main__":
    main()
