"""PNG figures a person would rather look at than read."""
from __future__ import annotations

import io
import os

import matplotlib

matplotlib.use("Agg")  # files only: no display on clusters
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from .data import CLASSES  # noqa: E402
from .files import write_atomic  # noqa: E402


CELL_NUMBERS_UP_TO = 20     # classes; above, the confusion matrix is colours only (CIFAR-100's 10,000 cells)


def confusion_png(confusion: list[list[int]], path: str, title: str = "", classes=CLASSES) -> None:
    """Rates per true class as colours; up to CELL_NUMBERS_UP_TO classes with each cell's count written in it.
    More classes (CIFAR-100): a bigger figure, small tick labels, no numbers."""
    cm = np.asarray(confusion, dtype=np.int64)
    rates = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    n = len(classes)
    few = n <= CELL_NUMBERS_UP_TO
    fig, ax = plt.subplots(figsize=(7, 6) if few else (14, 13), dpi=120)
    im = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ticks = {} if few else {"fontsize": 4.5}
    ax.set_xticks(range(n), classes, rotation=45 if few else 90, ha="right" if few else "center", **ticks)
    ax.set_yticks(range(n), classes, **ticks)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for i in range(n if few else 0):
        for j in range(n):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", fontsize=7,
                    color="white" if rates[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of the true class")
    ax.set_title(title or "confusion matrix")
    fig.tight_layout()
    save(fig, path)


def grid_figure(images: np.ndarray, titles: list[str], colors: list[str], suptitle: str, cols: int = 8):
    """The tutorial's imshow grid: each image under its title, each title in the space above its own image
    (constrained layout), never over the image above. images: float (N, 3, H, W) in [0, 1]."""
    n = len(images)
    cols = max(1, min(cols, n))
    rows = max(1, (n + cols - 1) // cols)
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig, axes = plt.subplots(rows, cols, figsize=(max(cols, 3) * 1.4, rows * (1.45 + 0.2 * lines) + 0.35), dpi=120,
                             squeeze=False, layout="constrained")
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k >= n:
            continue
        ax.imshow(np.transpose(images[k], (1, 2, 0)), interpolation="nearest")
        ax.set_title(titles[k], fontsize=7, color=colors[k])
    fig.suptitle(suptitle, fontsize=9)
    return fig


def grid_png(images: np.ndarray, titles: list[str], colors: list[str], suptitle: str, path: str) -> None:
    save(grid_figure(images, titles, colors, suptitle), path)


def predictions_figure(images: np.ndarray, labels, preds, cols: int = 8, classes=CLASSES):
    """Test images titled 'true / predicted', red where wrong (long names, CIFAR-100's, on two lines)."""
    sep = " / " if max(map(len, classes)) <= 8 else " /\n"
    titles = [f"{classes[t]}{sep}{classes[p]}" for t, p in zip(labels, preds)]
    colors = ["black" if t == p else "red" for t, p in zip(labels, preds)]
    return grid_figure(images, titles, colors, "true / predicted", cols)


def predictions_png(images: np.ndarray, labels, preds, path: str, cols: int = 8, classes=CLASSES) -> None:
    save(predictions_figure(images, labels, preds, cols, classes), path)


def save(fig, path: str) -> None:
    """The figure at exactly `path` (savefig would add .png to a name without an extension), in the format its
    extension names (PNG without one), written as files.write_atomic writes: whole, and only over a regular file."""
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format=os.path.splitext(path)[1][1:].lower() or "png")
    finally:
        plt.close(fig)          # pyplot keeps every open figure alive otherwise
    write_atomic(path, buffer.getvalue())
