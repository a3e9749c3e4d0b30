"""Compare runs: which settings differ between them, and what each one reached. A table and a PNG of the curves.

    python -m cifar.compare RUN... [--metric test/acc] [--output compare.png] [--format table|md|csv|json]
                            [--sort [-]KEY] [--where KEY=VALUE ...] [--by-seed | --each-run]

RUN: a run folder written by train.py; a sweep folder (no config.yaml, its children are run folders, e.g.
runs/<sweep>/): its runs in name order; or a quoted glob ('runs/debug-*'), expanded here.

The table has a column for every setting whose value differs among the runs shown: each config key, dotted as in
overrides (optim.lr), and `processes` (the number of processes: 2 under `accelerate launch --num_processes 2`).
Settings all of them share are printed once above it; keys that only name a run (output_dir, wandb.name,
wandb.tags, wandb.notes) are left out; "-" marks a key a run's config lacks (an older run). Then what each run
reached: best and final --metric, steps, time (summary.json's wall_seconds; for an unfinished run its epoch times
so far), images/s, and its state (cifar/run_folder.py): finished, running (its lock is held), stopped, failed or
save-failed (with the start of its error), or killed (it says running, or never said, and no process holds it).

--by-seed: runs that share every setting but the seed make one row: n, their seeds, mean ± sample std of best and
final --metric and of the time (over the runs that have a value), and their states ("2 finished, 1 failed"). It is
the default as soon as two runs shown differ only in seed; --each-run shows one row per run.

--sort KEY: by a setting, processes, best, final, time, steps or status; -KEY (or --sort=-KEY) descending; rows
without a value last. --where KEY=VALUE or KEY!=VALUE (repeatable, all must hold): VALUE is read as YAML and numbers
compare as numbers (optim.lr=1e-2 matches 0.01). Colours do not change with the argument order, --sort or --where.

--format md|csv|json: only that on stdout (json: {"metric", "mode", "shared", "rows"}; "wrote compare.png" goes to
stderr). The PNG (--output) has rows for --metric, the other test metric and the training loss of every logged step,
against the global step and against training time (the sum of epoch times: evaluation and restarts do not count).
A seed group is drawn as its mean with a band from its lowest to its highest run; unfinished runs are dashed.
"""
from __future__ import annotations

import argparse
import difflib
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field

import yaml

from . import compare_output, compare_plot, yaml_io
from .compare_output import MISSING, show, state_counts
from .compare_runs import RunRecord, read_run, run_folders
from .errors import UserError, cli

OUTCOMES = ("best", "final", "time", "steps", "status")


# ----------------------------------------------------------------------------- rows, --sort and --where

def _number(value) -> float | None:
    """A number, or a string that reads as one (YAML reads 1e-2 as a string); never a bool."""
    if isinstance(value, bool):
        return None
    try:
        return float(value) if isinstance(value, (int, float, str)) else None
    except ValueError:
        return None


def order_key(value) -> tuple:
    """Numbers as numbers, before other values (as text)."""
    number = _number(value)
    return (0, number, "") if number is not None else (1, 0.0, show(value))


def canon(value) -> str:
    """A value as a comparable, hashable string (lists and dicts included); MISSING unequal to all."""
    return "\0-" if value is MISSING else json.dumps(value, sort_keys=True, default=str)


def seed_id(run: RunRecord) -> str:
    """Every setting but the seed: runs with the same one are repeats of one experiment."""
    return canon({k: v for k, v in run.settings.items() if k != "seed"})


def seed_groups(runs: list[RunRecord]) -> list[list[RunRecord]]:
    groups: dict[str, list[RunRecord]] = {}
    for run in runs:
        groups.setdefault(seed_id(run), []).append(run)
    return list(groups.values())


@dataclass
class Row:
    """A table row and a plotted series: one run, or (by seed) the runs that share every setting but the seed."""
    runs: list[RunRecord]
    label: str = ""
    color: str = ""

    def value(self, key: str, metric: str):
        """A setting or outcome (for --sort and --where): a group's mean outcome, its lowest seed."""
        if key == "status":
            return self.runs[0].state if len(self.runs) == 1 else state_counts(self.runs)
        if key in OUTCOMES:
            values = [v for run in self.runs if (v := run.outcome(metric)[key]) is not None]
            return statistics.mean(values) if values else None
        return self.seeds()[0] if key == "seed" else self.runs[0].settings.get(key, MISSING)

    def seeds(self) -> list:
        return sorted((run.settings.get("seed", MISSING) for run in self.runs), key=order_key)


def sort_rows(rows: list[Row], spec: str, metric: str) -> list[Row]:
    """--sort [-]KEY, stable; rows without a value (null, or a key their config lacks) last either way."""
    key, descending = spec.lstrip("-"), spec.startswith("-")
    valued = [(row.value(key, metric), row) for row in rows]
    have = sorted([p for p in valued if p[0] is not None and p[0] is not MISSING], key=lambda p: order_key(p[0]),
                  reverse=descending)
    return [row for _, row in have] + [row for v, row in valued if v is None or v is MISSING]


@dataclass
class Where:
    """--where KEY=VALUE or KEY!=VALUE."""
    key: str
    text: str      # VALUE as typed
    negate: bool

    @classmethod
    def parse(cls, spec: str) -> Where:
        match = re.fullmatch(r"\s*([^=!\s]+)\s*(!=|=)(.*)", spec)
        if not match:
            raise UserError(f"--where {spec!r}: write KEY=VALUE or KEY!=VALUE, e.g. --where optim.lr=0.01")
        return cls(match[1], match[3].strip(), match[2] == "!=")

    def holds(self, run: RunRecord, metric: str) -> bool:
        value = Row([run]).value(self.key, metric)
        try:
            wanted = yaml_io.safe_load(self.text, f"--where {self.key}", yaml_io.VALUE_CHARS)
        except yaml.YAMLError:
            wanted = self.text
        a, b = _number(value), _number(wanted)
        if value is MISSING:
            same = False
        elif a is not None and b is not None:
            same = math.isclose(a, b, rel_tol=1e-9)
        else:  # the text too: YAML reads `no` (train.mixed_precision) as false
            same = value == wanted or str(value) == self.text
        return same != self.negate


def check_key(key: str, runs: list[RunRecord], flag: str) -> None:
    known = {k for run in runs for k in run.settings} | set(OUTCOMES)
    if key not in known:
        close = difflib.get_close_matches(key, sorted(known), n=3)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise UserError(f"{flag} {key}: no run has a setting or outcome of that name; {hint}use a config key as "
                        f"overrides write it (optim.lr), processes, or one of {', '.join(OUTCOMES)}")


def split_settings(runs: list[RunRecord], by_seed: bool) -> tuple[dict, list[str]]:
    """(settings all runs share, keys whose value differs): the second are the table's columns."""
    shared, differing = {}, []
    for key in dict.fromkeys(k for run in runs for k in run.settings):
        if len({canon(run.settings.get(key, MISSING)) for run in runs}) == 1:
            shared[key] = runs[0].settings[key]
        elif not (by_seed and key == "seed"):  # by seed, the seeds have their own column
            differing.append(key)
    return shared, differing


@dataclass
class View:
    """What is shown: the table's rows (runs or seed groups) and the settings they share or differ in."""
    metric: str
    by_seed: bool
    shared: dict
    differing: list[str]
    rows: list[Row]
    also: list[str] = field(default_factory=list)   # metrics shown beside --metric, their final value (top-k)

    @property
    def plotted(self) -> list[str]:
        """--metric, the other test metric, and the training loss of every logged step."""
        other = "test/acc" if self.metric == "test/loss" else "test/loss"
        return list(dict.fromkeys([self.metric, other, "train/loss"]))


def read_runs(args: list[str]) -> list[RunRecord]:
    """Every run the arguments name, once each (a glob and a name may both name one), in argument order."""
    folders: dict[str, str] = {}
    for arg in args:
        for path in run_folders(arg):
            folders.setdefault(os.path.realpath(path), path)
    runs = [read_run(path) for path in folders.values()]
    if len({r.name for r in runs}) < len(runs):  # same folder name under different parents: show the paths
        for run in runs:
            run.name = os.path.normpath(run.path)
    return runs


def select(loaded: list[RunRecord], args: argparse.Namespace) -> list[RunRecord]:
    """The runs --where keeps; refuses unknown keys (in --sort too) and a filter that keeps none."""
    wheres = [Where.parse(spec) for spec in args.where]
    for key, flag in [(w.key, "--where") for w in wheres] + ([(args.sort.lstrip("-"), "--sort")] if args.sort else []):
        check_key(key, loaded, flag)
    runs = [run for run in loaded if all(w.holds(run, args.metric) for w in wheres)]
    if not runs:
        have = "; ".join(f"{w.key} is {', '.join(sorted({show(Row([r]).value(w.key, args.metric)) for r in loaded}))}"
                         for w in wheres)
        raise UserError(f"no run matches --where {' '.join(args.where)} (in the {len(loaded)} runs given, {have}); "
                        f"loosen or drop a --where")
    logged = {k for run in runs for row in run.rows for k, v in row.items() if isinstance(v, (int, float))}
    if logged and args.metric not in logged:  # nothing logged yet (runs just started) is no typo
        raise UserError(f"no run logged metric {args.metric!r}; choose one of {', '.join(sorted(logged))}")
    return runs


def make_rows(runs: list[RunRecord], loaded: list[RunRecord], by_seed: bool, differing: list[str],
              metric: str) -> list[Row]:
    """A row per run, or per seed group, with its label and colour. Colours are dealt over every run given, before
    --where, in sorted order: a run (or group) keeps its colour whatever the order, --sort or --where."""
    rows = [Row(group) for group in seed_groups(runs)] if by_seed else [Row([run]) for run in runs]
    identity = seed_id if by_seed else (lambda run: run.name)
    colors = compare_plot.assign_colors(identity(run) for run in loaded)
    for row in rows:  # a group is named by the settings that set it apart (by its recipe when it is alone)
        pairs = ", ".join(f"{k}={show(row.value(k, metric))}" for k in differing)
        row.label = (pairs or str(row.runs[0].config.get("name", "runs"))) if by_seed else row.runs[0].name
        row.color = colors[identity(row.runs[0])]
    return rows


def build_view(args: argparse.Namespace) -> View:
    loaded = read_runs(args.runs)
    runs = select(loaded, args)
    by_seed = args.by_seed or (not args.each_run and any(len(g) > 1 for g in seed_groups(runs)))
    shared, differing = split_settings(runs, by_seed)
    rows = make_rows(runs, loaded, by_seed, differing, args.metric)
    return View(args.metric, by_seed, shared, differing, sort_rows(rows, args.sort, args.metric) if args.sort else rows,
                also=top_k_metrics(runs, args.metric))


def top_k_metrics(runs: list[RunRecord], metric: str) -> list[str]:
    """The top-k accuracies (test/acc_top5) any run logged, --metric aside: a column each. Runs from before
    train.top_k show "-" there."""
    logged = {k for run in runs for row in run.epochs() for k in row if re.fullmatch(r"test/acc_top\d+", k)}
    return sorted(logged - {metric}, key=lambda k: int(k.rpartition("top")[2]))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cifar.compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help="run folders, sweep folders or quoted globs")
    parser.add_argument("--output", default="compare.png", help="PNG to write (default: compare.png)")
    parser.add_argument("--metric", default="test/acc", help="metric for the table and the first plot row "
                                                             "(default: test/acc)")
    parser.add_argument("--format", default="table", choices=("table", "md", "csv", "json"),
                        help="table (default), md (GitHub markdown), csv or json; the last three alone on stdout")
    parser.add_argument("--sort", metavar="[-]KEY", help="sort by a setting (optim.lr), processes, best, final, "
                                                         "time, steps or status; -KEY descending")
    parser.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                        help="keep the runs whose KEY equals VALUE (KEY!=VALUE: differs); repeatable, all must hold")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--by-seed", action="store_true", help="one row per group of runs that differ only in seed "
                                                             "(the default when there is such a group)")
    mode.add_argument("--each-run", action="store_true", help="one row per run, even where runs differ only in seed")
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # `--sort -best`: argparse would take -best for an option
        if arg == "--sort" and re.match(r"-[^-]", argv[i + 1]):
            argv[i:i + 2] = [f"--sort={argv[i + 1]}"]
            break
    return parser.parse_args(argv)


@cli
def main(argv=None) -> None:
    args = parse_args(argv)
    view = build_view(args)
    compare_output.print_view(view, args.format)
    compare_plot.save(compare_plot.figure(view.rows, view.plotted), args.output)
    # table: for a person, on stdout as always; md/csv/json: stdout holds only the data, so a pipe can read it
    print(f"wrote {args.output}", file=sys.stdout if args.format == "table" else sys.stderr)


if __name__ == "__main__":
    main()
