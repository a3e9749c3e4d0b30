"""Compare runs side by side: a table on the terminal and a PNG of their test curves.

    python -m cifar.compare runs/a runs/b [RUN ...] [--output compare.png] [--metric test/acc]

Reads each run folder's config.yaml, metrics.jsonl and summary.json. A run without summary.json (still running,
stopped or crashed) is shown with what it has and marked "incomplete". The PNG has --metric and the test loss
(test accuracy when --metric is test/loss) against the global step and against training time (the sum of
epoch times, so evaluation and restarts do not count).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass

import numpy as np
import yaml

from .console import cell
from .errors import UserError, cli

LABELS = {"test/acc": "test accuracy (%)", "test/loss": "test loss", "train/loss": "train loss",
          "train/acc": "train accuracy (%)", "train/epoch_loss": "train loss (epoch)",
          "train/epoch_acc": "train accuracy (epoch, %)", "lr": "learning rate", "images_per_sec": "images/s"}
COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]


@dataclass
class Run:
    path: str
    name: str
    config: dict
    summary: dict | None      # None: no summary.json (running, stopped or crashed)
    rows: list[dict]          # metrics.jsonl, in order

    def epochs(self) -> list[dict]:
        """Per-epoch rows, one per epoch (the last written wins, so a resumed run counts each epoch once)."""
        by_epoch = {r["epoch"]: r for r in self.rows if "epoch_time" in r and "epoch" in r}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def curve(self, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(global step, training seconds, value) of a metric, sorted by step."""
        epochs = self.epochs()
        if any(metric in r for r in epochs):
            points = [r for r in epochs if metric in r]
        else:  # a per-step metric such as train/loss: one point per step, the last written wins
            points = list({r["step"]: r for r in self.rows if metric in r and "epoch_time" not in r}.values())
        points = [r for r in sorted(points, key=lambda r: r["step"]) if isinstance(r[metric], (int, float))]
        steps = np.array([r["step"] for r in points], dtype=float)
        ends = np.array([0] + [r["step"] for r in epochs], dtype=float)
        times = np.cumsum([0.0] + [r["epoch_time"] or 0.0 for r in epochs])
        return steps, np.interp(steps, ends, times), np.array([r[metric] for r in points], dtype=float)


def _read_json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def load_run(path: str) -> Run:
    config_path = os.path.join(path, "config.yaml")
    if not os.path.isfile(config_path):
        raise UserError(f"{path} is not a run folder (no config.yaml); pass folders written by train.py, "
                        f"e.g. runs/<name>-<time>")
    try:
        with open(config_path) as f:
            config = yaml.safe_load(f) or {}
    except yaml.YAMLError:
        raise UserError(f"{config_path} is not valid YAML; is {path} a run folder written by train.py?")
    rows = []
    if os.path.isfile(os.path.join(path, "metrics.jsonl")):
        with open(os.path.join(path, "metrics.jsonl")) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue  # a line cut short by a kill
                if isinstance(row, dict) and "step" in row:
                    rows.append(row)
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    return Run(path, name, config, _read_json(os.path.join(path, "summary.json")), rows)


def best_final(run: Run, metric: str) -> tuple[float | None, float | None]:
    values = run.curve(metric)[2]
    if not len(values):
        return None, None
    return float(values.min() if "loss" in metric else values.max()), float(values[-1])


def print_table(runs: list[Run], metric: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{len(runs)} runs", title_justify="left")
    for column in ("run", "recipe", "model", "procs", "precision", "epochs", "steps", f"best {metric}",
                   f"final {metric}", "time", "img/s", "status"):
        table.add_column(column, no_wrap=True, justify="left" if column in ("run", "recipe", "model") else "right")
    for i, run in enumerate(runs):
        s, c, epochs = run.summary or {}, run.config, run.epochs()
        best, final = best_final(run, metric)
        seconds = s.get("wall_seconds", sum(r.get("epoch_time") or 0.0 for r in epochs) if epochs else None)
        speed = s.get("images_per_sec", epochs[-1].get("images_per_sec") if epochs else None)
        steps = s.get("steps", run.rows[-1]["step"] if run.rows else None)
        table.add_row(f"[{COLORS[i % len(COLORS)]}]{run.name}[/]", str(c.get("name", "-")),
                      str(c.get("model", {}).get("name", "-")), cell(s.get("world_size"), "{}"),
                      str(c.get("train", {}).get("mixed_precision", "-")), str(len(epochs)), cell(steps, "{}"),
                      cell(best, "{:.2f}" if "acc" in metric else "{:.4g}"),
                      cell(final, "{:.2f}" if "acc" in metric else "{:.4g}"), cell(seconds, "{:.1f}s"),
                      cell(speed, "{:.0f}"), "finished" if run.summary else "[yellow]incomplete[/]")
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def plot(runs: list[Run], metrics: list[str], output: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(metrics), 2, figsize=(12, 4 * len(metrics)), dpi=110, squeeze=False)
    for row, metric in zip(axes, metrics):
        for i, run in enumerate(runs):
            steps, seconds, values = run.curve(metric)
            if not len(values):
                continue
            style = dict(color=COLORS[i % len(COLORS)], marker="o", markersize=3.5, linewidth=1.6,
                         linestyle="-" if run.summary else "--",
                         label=run.name if run.summary else f"{run.name} (incomplete)")
            row[0].plot(steps, values, **style)
            row[1].plot(seconds, values, **style)
        for ax, x in zip(row, ("global step", "training time (s)")):
            ax.set_xlabel(x)
            ax.set_ylabel(LABELS.get(metric, metric))
            ax.set_title(f"{LABELS.get(metric, metric)} vs {x.split(' (')[0]}", fontsize=10)
            ax.grid(True, alpha=0.3)
            ax.set_xlim(left=0)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=min(len(labels), 4) or 1, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.94 if len(labels) <= 4 else 0.9))
    folder = os.path.dirname(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    fig.savefig(output)
    plt.close(fig)


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifar.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders written by train.py")
    parser.add_argument("--output", default="compare.png", help="PNG to write (default: compare.png)")
    parser.add_argument("--metric", default="test/acc", help="metric for the table and the first plot row "
                                                             "(default: test/acc)")
    args = parser.parse_args(argv)
    runs = [load_run(path) for path in args.runs]
    if len({r.name for r in runs}) < len(runs):  # same folder name under different parents: show the paths
        for run in runs:
            run.name = os.path.normpath(run.path)
    if not any(args.metric in row for run in runs for row in run.rows):
        known = sorted({k for run in runs for row in run.rows for k, v in row.items() if isinstance(v, (int, float))})
        raise UserError(f"no run logged metric {args.metric!r}; choose one of {', '.join(known) or '(none yet)'}")
    print_table(runs, args.metric)
    second = "test/acc" if args.metric == "test/loss" else "test/loss"
    plot(runs, [args.metric, second], args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
