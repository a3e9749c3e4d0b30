"""python -m cifar.compare's PNG: a figure of the rows' curves (figure), written by save.

A row is duck-typed: .label, .color and .runs (cifar.compare_runs.RunRecord: .curve(metric), .state). Matplotlib is
imported only when a figure is drawn, and through Figure rather than pyplot: no global figure state, nothing to
close."""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np

from .compare_output import state_counts
from .run_folder import FINISHED

LABELS = {"test/acc": "test accuracy (%)", "test/loss": "test loss", "train/loss": "train loss (per logged step)",
          "train/acc": "train accuracy (%)", "train/epoch_loss": "train loss (epoch)",
          "train/epoch_acc": "train accuracy (epoch, %)", "lr": "learning rate", "images_per_sec": "images/s"}
# tab10, then its lighter tab20 shades: 20 distinguishable colours before any repeats
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
           "#dbdb8d", "#9edae5"]


def assign_colors(identities: Iterable[str]) -> dict[str, str]:
    """A colour per run (or seed group), given in the sorted order of their identities: the same whatever the order
    of the arguments or --sort, distinct up to 20, and (drawn from all runs given, before --where) unchanged by
    filtering. A hash would also survive adding runs, but could not promise distinct colours for a few runs."""
    return {identity: PALETTE[i % len(PALETTE)] for i, identity in enumerate(sorted(set(identities)))}


def spread(curves: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...]:
    """A seed group's curves (step, seconds, value) on one grid, the union of their steps (runs that differ only in
    seed log and evaluate at the same steps): (steps, mean seconds, mean, min, max). A run counts from its first to
    its last point, so an unfinished one does not cut the others short."""
    steps = np.unique(np.concatenate([c[0] for c in curves]))

    def on_grid(x, y):
        inside, out = (steps >= x[0]) & (steps <= x[-1]), np.full(len(steps), np.nan)
        out[inside] = np.interp(steps[inside], x, y)
        return out

    seconds = np.stack([on_grid(c[0], c[1]) for c in curves])
    values = np.stack([on_grid(c[0], c[2]) for c in curves])
    return steps, np.nanmean(seconds, 0), np.nanmean(values, 0), np.nanmin(values, 0), np.nanmax(values, 0)


def _legend(row) -> str:
    """The row's label, what is not finished, and for a group what its band is."""
    unfinished = [run for run in row.runs if run.state != FINISHED]
    if len(row.runs) == 1:
        return row.label + (f" ({unfinished[0].state})" if unfinished else "")
    return f"{row.label} (mean of {len(row.runs)}, band min-max{', ' + state_counts(unfinished) if unfinished else ''})"


def figure(rows, metrics: list[str]):
    """The curves of `metrics` (one figure row each) against the global step and against training time: a line
    per run; a seed group's mean line over a band from its lowest to its highest run. Returns the Figure."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.6 * len(metrics)), dpi=110, layout="constrained")  # the legend above, outside
    axes = fig.subplots(len(metrics), 2, squeeze=False)
    for ax_row, metric in zip(axes, metrics):
        for row in rows:
            curves = [c for c in (run.curve(metric) for run in row.runs) if len(c[2])]
            style = dict(color=row.color, linewidth=1.6, label=_legend(row),
                         linestyle="-" if all(run.state == FINISHED for run in row.runs) else "--")
            for ax, axis in zip(ax_row, (0, 1)):  # curve()[0]: steps, [1]: seconds
                if len(curves) == 1:  # epoch points marked; per-step training loss is too dense for markers
                    x, y = curves[0][axis], curves[0][2]
                    ax.plot(x, y, marker="o" if len(x) <= 40 else None, markersize=3.5, **style)
                elif curves:  # against time: each step at the group's mean time to reach it
                    steps, seconds, mean, low, high = spread(curves)
                    x = steps if axis == 0 else seconds
                    ax.fill_between(x, low, high, color=row.color, alpha=0.2, linewidth=0)
                    ax.plot(x, mean, **style)
        for ax, x in zip(ax_row, ("global step", "training time (s)")):
            ax.set_xlabel(x)
            ax.set_ylabel(LABELS.get(metric, metric))
            ax.set_title(f"{LABELS.get(metric, metric)} vs {x.split(' (')[0]}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.set_xlim(left=0)
    legend = {}  # every row once, whichever panel it has data in
    for ax in axes.flat:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(list(legend.values()), list(legend), loc="outside upper center", ncol=min(len(legend), 3) or 1,
               frameon=False, fontsize=9)
    return fig


def save(fig, output: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    # the format its extension names, PNG without one: given no format, savefig would write OUTPUT.png while
    # compare says it wrote OUTPUT
    fig.savefig(output, format=os.path.splitext(output)[1][1:].lower() or "png")
