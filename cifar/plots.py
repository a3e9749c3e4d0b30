"""PNG figures a person would rather look at than read."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import CLASSES  # noqa: E402


def confusion_png(confusion: list[list[int]], path: str, title: str = "") -> None:
    cm = np.asarray(confusion, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(7, 6), dpi=120)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(CLASSES)), CLASSES, rotation=45, ha="right")
    ax.set_yticks(range(len(CLASSES)), CLASSES)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(len(CLASSES)):
        for j in range(len(CLASSES)):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def predictions_figure(images: np.ndarray, labels, preds, cols: int = 8):
    """The tutorial's imshow grid: each image titled 'true / predicted', red where wrong, each title in the space
    above its own image (constrained layout), never over the image above. images: float (N, 3, 32, 32) in [0, 1]."""
    n = len(images)
    rows = max(1, (n + cols - 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.4, rows * 1.65 + 0.35), dpi=120, squeeze=False,
                             layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(np.transpose(images[k], (1, 2, 0)), interpolation="nearest")
        ok = labels[k] == preds[k]
        ax.set_title(f"{CLASSES[labels[k]]} / {CLASSES[preds[k]]}", fontsize=7, color="black" if ok else "red")
    fig.suptitle("true / predicted", fontsize=9)
    return fig


def predictions_png(images: np.ndarray, labels, preds, path: str, cols: int = 8) -> None:
    fig = predictions_figure(images, labels, preds, cols)
    fig.savefig(path)
    plt.close(fig)
