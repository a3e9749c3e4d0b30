"""The PNGs a person looks at: the prediction grid's titles never cover an image."""
import numpy as np
import pytest

from cifar.plots import grid_figure, predictions_figure


def overlaps(fig) -> list[tuple[int, int]]:
    """(title k, image j) pairs whose drawn boxes intersect, after the layout is applied."""
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    axes = [ax for ax in fig.axes if ax.images]
    titles = [ax.title.get_window_extent(renderer) for ax in axes]
    images = [ax.get_window_extent(renderer) for ax in axes]
    return [(k, j) for k, t in enumerate(titles) for j, box in enumerate(images) if t.overlaps(box)]


@pytest.mark.parametrize("n", [16, 5, 30])
def test_prediction_grid_titles_do_not_cover_images(n):
    rng = np.random.default_rng(0)
    images = rng.random((n, 3, 32, 32), dtype=np.float32)
    labels, preds = rng.integers(0, 10, n).tolist(), rng.integers(0, 10, n).tolist()
    fig = predictions_figure(images, labels, preds)
    assert len([ax for ax in fig.axes if ax.images]) == n
    assert overlaps(fig) == []


@pytest.mark.parametrize("n", [1, 5, 20])
def test_two_line_titles_of_predict_grid_do_not_cover_images(n):
    """predict.py --grid: file name and top class on two lines above each image, down to a single image."""
    images = np.random.default_rng(0).random((n, 3, 32, 32), dtype=np.float32)
    titles = [f"holiday-photo-{k:03d}.jpg\ncat 87%" for k in range(n)]
    fig = grid_figure(images, titles, ["black"] * n, "what the network saw (32x32): top class")
    assert len([ax for ax in fig.axes if ax.images]) == n
    assert overlaps(fig) == []
