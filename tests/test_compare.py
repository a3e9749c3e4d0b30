"""python -m cifar.compare on real run folders: the table, the PNG, and one line + exit 2 for bad input; which
settings differ, seed groups and their statistics, --sort/--where, the formats, and the figure's artists."""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import statistics
import subprocess
import sys

import numpy as np
import pytest
import yaml
from matplotlib.collections import PolyCollection
from PIL import Image

from cifar import compare_output, compare_plot, compare_runs, console, nested, tracking
from cifar import config as config_module
from cifar.compare import build_view, main, parse_args, read_run
from conftest import ROOT, env, lock_held_by_child, read_json, read_jsonl
from test_sweep import as_yaml, sweep_doc

from train import main as train_main

RECIPES = {  # three small real runs, ~5 s each on one core; the last one is made to look killed
    "sgd-slow": ["optim.lr=0.01"],
    "sgd-fast": ["optim.lr=0.05"],
    "adamw-cut": ["optim.name=adamw", "optim.lr=0.003"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Trained in this process (compare reads run folders; how they were written is train.py's tests' business)."""
    root = tmp_path_factory.mktemp("runs")
    for name, overrides in RECIPES.items():
        train_main(["--config", "configs/debug.yaml", "data.limit_train=384", "data.limit_test=256", "train.epochs=4",
                    *overrides, f"output_dir={root / name}"])
    os.remove(root / "adamw-cut" / "summary.json")  # as a kill before the end leaves it: no summary, status running,
    (root / "adamw-cut" / "status.json").write_text(json.dumps({"state": "running", "step": 40}))  # nobody holding
    return [str(root / name) for name in RECIPES]


def compare(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "cifar.compare", *args], capture_output=True, text=True,
                          timeout=120, env=env(), cwd=cwd)


@pytest.mark.slow
def test_table_and_png(runs, tmp_path):
    png = tmp_path / "out" / "compare.png"
    proc = compare(*runs, "--output", str(png))
    assert proc.returncode == 0, proc.stderr
    for name in RECIPES:
        assert name in proc.stdout
    lines = {name: next(line for line in proc.stdout.splitlines() if name in line) for name in RECIPES}
    assert "finished" in lines["sgd-slow"] and "killed" in lines["adamw-cut"]
    # what all three share is said once above the table; each row has what differs (optim.lr, optim.name)
    shared = proc.stdout.split("\n┏")[0]
    assert "model.name=tutorial_net" in shared and "name=debug" in shared and "optim.lr" not in shared
    assert "0.05" in lines["sgd-fast"] and "adamw" in lines["adamw-cut"]
    assert f"wrote {png}" in proc.stdout
    image = Image.open(png).convert("RGB")
    assert image.size[0] >= 1000 and image.size[1] >= 700
    pixels = np.asarray(image).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 200                 # lines, text, antialiasing: a real plot
    assert (pixels.min(1) < 200).mean() > 0.02                   # and not an empty white page
    for color in ([31, 119, 180], [255, 127, 14], [44, 160, 44]):  # one curve colour per run
        assert (np.abs(pixels.astype(int) - color).sum(1) < 30).sum() > 200, color


def test_other_metric(runs, tmp_path):
    proc = compare(*runs, "--metric", "train/loss", "--output", str(tmp_path / "loss.png"))
    assert proc.returncode == 0, proc.stderr
    assert "best train/loss" in proc.stdout and (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("bad", ["missing-folder", "."])
def test_not_a_run_folder_is_one_line_and_exit_2(runs, tmp_path, bad):
    proc = compare(runs[0], str(tmp_path / bad) if bad != "." else str(tmp_path), "--output",
                   str(tmp_path / "x.png"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "not a run folder" in proc.stderr
    assert not (tmp_path / "x.png").exists() and proc.stdout == ""


def test_unknown_metric_is_one_line_and_exit_2(runs):
    proc = compare(*runs, "--metric", "test/nothing")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "test/acc" in proc.stderr  # names what exists


def test_resumed_and_cut_short_metrics(tmp_path):
    """A resumed run writes some epochs twice, and a kill can leave half a line: each epoch counts once."""
    (tmp_path / "config.yaml").write_text("name: debug\nmodel: {name: tutorial_net}\n")
    rows = [{"step": 10, "epoch": 0, "train/loss": 2.0},
            {"step": 10, "epoch": 0, "epoch_time": 2.0, "test/acc": 10.0, "test/loss": 2.2},
            {"step": 20, "epoch": 1, "epoch_time": 3.0, "test/acc": 20.0, "test/loss": 2.0},
            {"step": 20, "epoch": 1, "epoch_time": 3.0, "test/acc": 21.0, "test/loss": 1.9},  # after the resume
            {"step": 30, "epoch": 2, "epoch_time": 1.0, "test/acc": 30.0, "test/loss": 1.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4')
    r = read_run(str(tmp_path))
    assert r.summary is None and len(r.epochs()) == 3
    steps, seconds, values = r.curve("test/acc")
    assert steps.tolist() == [10, 20, 30] and seconds.tolist() == [2.0, 5.0, 6.0] and values.tolist() == [10, 21, 30]
    steps, seconds, values = r.curve("train/loss")
    assert steps.tolist() == [10] and seconds.tolist() == [2.0]


# ----------------------------------------------------------------------------- what differs, --sort, --where

OUTCOME_KEYS = ["best", "final", "steps", "time", "images_per_sec", "status"]            # runs without top-k
TOP5_OUTCOME_KEYS = ["best", "final", "test/acc_top5", "steps", "time", "images_per_sec", "status"]


def view(*args):
    """What `python -m cifar.compare ARGS` shows, in-process (no PNG): the rows and the settings."""
    return build_view(parse_args([*args]))


def names(v) -> list[str]:
    return [row.label for row in v.rows]


def as_json(capsys, *args) -> dict:
    main([*args, "--format", "json"])
    return json.loads(capsys.readouterr().out)


def test_the_columns_are_exactly_the_settings_that_differ(runs, tmp_path, capsys):
    main([*runs, "--format", "json", "--output", str(tmp_path / "c.png")])
    out, err = capsys.readouterr()
    data = json.loads(out)                                   # stdout holds the JSON and nothing else
    assert err == f"wrote {tmp_path / 'c.png'}\n"
    assert data["mode"] == "each-run" and data["metric"] == "test/acc"
    assert [list(row) for row in data["rows"]] == [["run", "optim.name", "optim.lr", *TOP5_OUTCOME_KEYS]] * 3
    assert [(r["run"], r["optim.name"], r["optim.lr"]) for r in data["rows"]] == [
        ("sgd-slow", "sgd", 0.01), ("sgd-fast", "sgd", 0.05), ("adamw-cut", "adamw", 0.003)]
    shared = data["shared"]
    assert shared["model.name"] == "tutorial_net" and shared["train.epochs"] == 4 and shared["seed"] == 0
    assert shared["processes"] == 1            # adamw-cut lost its summary.json: from its checkpoint
    assert not {"output_dir", "wandb.name", "wandb.tags", "wandb.notes", "optim.lr"} & set(shared)
    for row, path in zip(data["rows"], runs):
        metrics = [r["test/acc"] for r in read_jsonl(os.path.join(path, "metrics.jsonl")) if "test/acc" in r]
        assert (row["best"], row["final"]) == (max(metrics), metrics[-1])


def test_sort_and_where(runs):
    assert names(view(*runs, "--sort", "optim.lr")) == ["adamw-cut", "sgd-slow", "sgd-fast"]
    assert names(view(*runs, "--sort", "-optim.lr")) == ["sgd-fast", "sgd-slow", "adamw-cut"]
    assert names(view(*runs, "--sort=-optim.lr")) == ["sgd-fast", "sgd-slow", "adamw-cut"]
    best = {os.path.basename(p): max(r["test/acc"] for r in read_jsonl(os.path.join(p, "metrics.jsonl"))
                                      if "test/acc" in r) for p in runs}
    assert names(view(*runs, "--sort", "-best")) == sorted(best, key=lambda n: -best[n])
    assert names(view(*runs, "--sort", "status")) == ["sgd-slow", "sgd-fast", "adamw-cut"]  # finished < killed
    for where, expected in [("optim.lr=0.01", ["sgd-slow"]), ("optim.lr=1e-2", ["sgd-slow"]),  # numbers as numbers
                            ("optim.lr=0.010", ["sgd-slow"]), ("optim.lr!=0.01", ["sgd-fast", "adamw-cut"]),
                            ("optim.name=adamw", ["adamw-cut"]), ("status=killed", ["adamw-cut"]),
                            ("processes=1", ["sgd-slow", "sgd-fast", "adamw-cut"])]:
        assert names(view(*runs, "--where", where)) == expected, where
    assert names(view(*runs, "--where", "optim.name=sgd", "--where", "optim.lr!=0.05")) == ["sgd-slow"]
    v = view(*runs, "--where", "optim.name=sgd")
    assert v.differing == ["optim.lr"] and v.shared["optim.name"] == "sgd"   # what differs among the runs shown


@pytest.mark.parametrize("args, says", [(["--sort", "optim.lrr"], "did you mean optim.lr"),
                                        (["--sort", "-nothing"], "no run has a setting"),
                                        (["--where", "optim.lrr=0.1"], "did you mean optim.lr"),
                                        (["--where", "optim.lr=0.5"], "no run matches --where optim.lr=0.5"),
                                        (["--where", "optim.lr"], "KEY=VALUE")])
def test_bad_sort_and_where_are_one_line_and_exit_2(runs, tmp_path, args, says):
    proc = compare(*runs, *args, "--output", str(tmp_path / "x.png"))
    assert proc.returncode == 2 and proc.stdout == "" and not (tmp_path / "x.png").exists()
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1 and says in proc.stderr, proc.stderr


def test_sweep_folder_and_glob_find_the_runs(runs, tmp_path):
    root = os.path.dirname(runs[0])
    listed = sorted(runs)                        # adamw-cut, sgd-fast, sgd-slow: name order
    assert names(view(root)) == names(view(*listed))
    assert names(view(os.path.join(root, "sgd-*"))) == ["sgd-fast", "sgd-slow"]   # a quoted glob: compare expands it
    sweep = tmp_path / "sweep"                   # a sweep folder's children that are not runs are left out
    (sweep / "logs").mkdir(parents=True)
    (sweep / "notes.txt").write_text("x")
    for path in runs:
        os.symlink(path, sweep / os.path.basename(path))
    assert names(view(str(sweep))) == names(view(*listed))
    assert names(view(str(sweep), runs[0], os.path.join(root, "*"))) == names(view(*listed))   # each run once
    proc = compare(str(tmp_path / "nothing-*"))
    assert proc.returncode == 2 and "matches no run folder" in proc.stderr and proc.stderr.count("\n") == 1


def test_missing_keys_and_empty_runs(tmp_path, capsys):
    """Hand-written run folders: an older config without the optim section, no metrics yet. Sorted last, "-"."""
    for name, config in [("a", "{name: debug, optim: {lr: 0.1}}"), ("b", "{name: debug, optim: {lr: 0.3}}"),
                         ("c", "{name: debug}")]:
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.yaml").write_text(config + "\n")
    assert names(view(str(tmp_path), "--sort", "optim.lr")) == ["a", "b", "c"]
    assert names(view(str(tmp_path), "--sort", "-optim.lr")) == ["b", "a", "c"]
    compare_output.print_view(view(str(tmp_path)), "csv")
    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rows == [["run", "optim.lr", *OUTCOME_KEYS], ["a", "0.1", "", "", "", "", "", "killed"],
                    ["b", "0.3", "", "", "", "", "", "killed"], ["c", "-", "", "", "", "", "", "killed"]]


def test_a_binary_config_and_wrong_typed_rows_are_one_line_or_shown_never_a_traceback(tmp_path, capsys):
    """What compare reads is hostile too: a config.yaml of random bytes is one line naming it, exit 2; metric rows and
    a summary.json whose values have the wrong types are left out of the figures, not a crash."""
    good, binary, typed = (tmp_path / n for n in ("good", "binary", "typed"))
    for folder, seed in ((good, 0), (typed, 1)):
        folder.mkdir()
        (folder / "config.yaml").write_text(f"{{name: debug, seed: {seed}}}\n")
    (good / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "epoch": 0, "test/acc": 50.0 + i,
                                                             "train/loss": 1.0 / i}) + "\n" for i in (1, 2)))
    (typed / "metrics.jsonl").write_text("\n".join(json.dumps(row) for row in (
        {"step": "x", "test/acc": "abc"}, {"step": 3, "epoch": "e", "test/acc": "abc", "train/loss": [1]},
        {"step": 4, "test/acc": None, "train/loss": {"a": 1}})) + "\n")
    (typed / "summary.json").write_text(json.dumps({"best_test_acc": "high", "final_test_acc": [1],
                                                    "train_seconds": "x"}))
    binary.mkdir()
    (binary / "config.yaml").write_bytes(bytes(range(256)) * 10)
    with pytest.raises(SystemExit) as e:
        main([str(good), str(binary), "--output", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and err.startswith("error: ")
    assert str(binary / "config.yaml") in err and "not a text (YAML) file" in err
    assert not (tmp_path / "x.png").exists()
    for fmt in ("table", "md", "csv", "json"):
        main([str(good), str(typed), "--each-run", "--format", fmt, "--output", str(tmp_path / f"{fmt}.png")])
        out = capsys.readouterr().out
        assert "good" in out and "typed" in out and (tmp_path / f"{fmt}.png").is_file()


# ----------------------------------------------------------------------------- formats and statuses

@pytest.mark.parametrize("fmt", ["md", "csv"])  # json, and the PNG's line on stderr: test_the_columns_are_exactly...
def test_formats_hold_only_their_output(runs, capsys, fmt):
    compare_output.print_view(view(*runs), fmt)
    out, err = capsys.readouterr()
    assert err == ""
    if fmt == "csv":
        rows = list(csv.reader(io.StringIO(out)))
        assert rows[0] == ["run", "optim.name", "optim.lr", *TOP5_OUTCOME_KEYS] and len(rows) == 4
        assert {len(r) for r in rows} == {len(rows[0])} and float(rows[2][2]) == 0.05
    else:
        lines = out.splitlines()
        assert lines[0].startswith("shared: ") and "`model.name=tutorial_net`" in lines[0] and lines[1] == ""
        assert lines[2] == ("| run | optim.name | optim.lr | best test/acc | final test/acc | final test/acc_top5 | steps "
                            "| time | img/s | status |")
        assert len(lines) == 7 and all(line.startswith("|") and line.endswith("|") for line in lines[2:])
        assert lines[3].startswith("|---|---|---:|") and "sgd-fast" in lines[5] and "killed" in lines[6]


def test_failed_running_stopped_and_empty_runs_show_their_state(runs, tmp_path, capsys):
    """Copies of a real run in each state a run folder can be found in: a row each, exit 0, never a traceback. A
    status.json saying running is running only while a process holds the folder's lock (a child here), else killed."""
    states = {"failed": {"state": "failed", "step": 20, "error": "RuntimeError: CUDA out of memory. Tried to "
                                                                 "allocate 2.00 GiB (GPU 0; 79.15 GiB total)"},
              "save-failed": {"state": "save-failed", "step": 20, "error": "SaveFailed: could not save checkpoint"},
              "running": {"state": "running", "step": 20, "world_size": 1}, "stopped": {"state": "stopped"},
              "crashed": {"state": "running", "step": 20, "world_size": 1}}
    for name, status in states.items():
        shutil.copytree(runs[1], tmp_path / name)
        os.remove(tmp_path / name / "summary.json")
        (tmp_path / name / "status.json").write_text(json.dumps(status))
    with open(tmp_path / "running" / "metrics.jsonl", "a") as f:
        f.write('{"step": 50, "epoch": 4, "train/lo')                     # a line being written
    (tmp_path / "empty").mkdir()                                            # config.yaml written, nothing else
    shutil.copy(os.path.join(runs[1], "config.yaml"), tmp_path / "empty")
    (tmp_path / "half").mkdir()                                             # a half-written status.json
    shutil.copy(os.path.join(runs[1], "config.yaml"), tmp_path / "half")
    (tmp_path / "half" / "status.json").write_text('{"state": "runn')
    with lock_held_by_child(str(tmp_path / "running")):
        main([str(tmp_path), "--each-run", "--output", str(tmp_path / "c.png")])   # in-process: errors raise here
    out = capsys.readouterr().out
    line = {name: next(x for x in out.splitlines() if f" {name} " in x)
            for name in ("failed", "save-failed", "running", "stopped", "crashed", "empty", "half")}
    assert "failed: RuntimeError: CUDA out of memory. Tried to allocate" in line["failed"]
    assert "save-failed: SaveFailed: could not save" in line["save-failed"]
    assert "running" in line["running"].split("│")[-2] and "stopped" in line["stopped"]
    assert "killed" in line["crashed"].split("│")[-2]
    assert "killed" in line["empty"] and "killed" in line["half"]


def test_by_seed_on_runs_that_all_differ_is_one_run_per_group(runs):
    assert not view(*runs).by_seed                      # no two runs differ only in seed: one row per run
    v = view(*runs, "--by-seed")
    assert v.by_seed and [len(row.runs) for row in v.rows] == [1, 1, 1]
    assert names(v) == ["optim.name=sgd, optim.lr=0.01", "optim.name=sgd, optim.lr=0.05",
                        "optim.name=adamw, optim.lr=0.003"]


# ----------------------------------------------------------------------------- the figure

def lines_by_label(ax) -> dict:
    return {line.get_label().split(" (")[0]: line for line in ax.get_lines()}


def test_figure_has_the_training_loss_of_every_logged_step(runs):
    v = view(*runs)
    fig = compare_plot.figure(v.rows, v.plotted)
    axes = fig.axes
    assert [ax.get_ylabel() for ax in axes] == ["test accuracy (%)"] * 2 + ["test loss"] * 2 + \
        ["train loss (per logged step)"] * 2
    by_step, by_time = axes[4], axes[5]
    assert by_step.get_title() == "train loss (per logged step) vs global step"
    assert by_time.get_title() == "train loss (per logged step) vs training time"
    for path in runs:
        logged = {r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(path, "metrics.jsonl"))
                  if "train/loss" in r}
        line = lines_by_label(by_step)[os.path.basename(path)]
        assert list(line.get_xdata()) == sorted(logged) and list(line.get_ydata()) == [logged[s] for s in
                                                                                         sorted(logged)]
        timed = lines_by_label(by_time)[os.path.basename(path)]
        assert list(timed.get_ydata()) == list(line.get_ydata()) and np.all(np.diff(timed.get_xdata()) >= 0)
    assert lines_by_label(by_step)["adamw-cut"].get_linestyle() == "--"   # no summary.json: dashed
    assert not any(isinstance(c, PolyCollection) for ax in axes for c in ax.collections)   # single runs: no band


def test_colours_follow_the_run_not_the_order_sort_or_where(runs):
    def colours(*args):
        return {row.label: row.color for row in view(*args).rows}

    first = colours(*runs)
    assert len(set(first.values())) == 3
    assert colours(*reversed(runs)) == first == colours(*runs, "--sort", "-best")
    assert colours(*runs, "--where", "optim.name=sgd") == {k: first[k] for k in ("sgd-slow", "sgd-fast")}
    v = view(*reversed(runs))
    fig = compare_plot.figure(v.rows, v.plotted)
    assert {k: line.get_color() for k, line in lines_by_label(fig.axes[0]).items()} == first


# ----------------------------------------------------------------------------- seed groups (a sweep of real runs)

SWEEP = [(lr, seed) for lr in (0.01, 0.05) for seed in (0, 1)] + [(0.05, 2)]   # the last one fails in epoch 2
FAILED = "04-optim.lr=0.05,seed=2"


@pytest.fixture(scope="module")
def sweep(shared_sweep, tmp_path_factory):
    """runs/<sweep>/NN-optim.lr=..,seed=.. as a sweep writes them: test_sweep's 2 x 2 grid (run once per session),
    and a fifth, lr=0.05 seed=2, that failed in its 2nd epoch: the lr=0.05 seed=1 run's folder relabelled seed=2
    and cut back to its first epoch, with a failed status.json (compare reads the figures from the files)."""
    _, runs_dir, _ = shared_sweep(as_yaml(sweep_doc()), "tiny.yaml")
    root = tmp_path_factory.mktemp("sweep") / "lr-sweep"
    shutil.copytree(runs_dir / "tiny", root)
    failed = root / FAILED
    shutil.copytree(root / "03-optim.lr=0.05,seed=1", failed)
    config = yaml.safe_load((failed / "config.yaml").read_text())
    config["seed"] = 2
    (failed / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    os.remove(failed / "summary.json")
    rows = read_jsonl(failed / "metrics.jsonl")
    (failed / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= 8))
    (failed / "status.json").write_text(json.dumps({"state": "failed", "step": 10, "error": "ValueError: boom"}))
    return root


def sweep_runs(root) -> list[str]:
    return [str(root / f"{i:02d}-optim.lr={lr},seed={seed}") for i, (lr, seed) in enumerate(SWEEP)]


@pytest.mark.slow
def test_seed_groups_mean_and_std(sweep, tmp_path, capsys):
    data = as_json(capsys, str(sweep), "--output", str(tmp_path / "c.png"))   # default: by seed
    assert data["mode"] == "by-seed" and "seed" not in data["shared"] and data["shared"]["processes"] == 1
    assert [list(r)[:4] for r in data["rows"]] == [["group", "optim.lr", "n", "seeds"]] * 2
    low, high = data["rows"]
    assert (low["optim.lr"], low["n"], low["seeds"], low["status"]) == (0.01, 2, [0, 1], "2 finished")
    assert (high["optim.lr"], high["n"], high["seeds"], high["status"]) == (0.05, 3, [0, 1, 2], "2 finished, 1 failed")
    summaries = [read_json(os.path.join(p, "summary.json")) for p in sweep_runs(sweep)[:4]]
    epoch0 = [r for r in read_jsonl(sweep / FAILED / "metrics.jsonl") if "test/acc" in r]
    for row, runs_, extra in [(low, summaries[:2], None), (high, summaries[2:], epoch0[0])]:
        for key, summary_key, failed_key in [("best", "best_test_acc", "test/acc"),
                                             ("final", "final_test_acc", "test/acc"),
                                             ("time", "wall_seconds", "epoch_time")]:
            values = [s[summary_key] for s in runs_] + ([extra[failed_key]] if extra else [])
            assert row[key] == pytest.approx(statistics.mean(values), rel=1e-12), key
            assert row[f"{key}_std"] == pytest.approx(statistics.stdev(values), rel=1e-12), key
    main([str(sweep), "--output", str(tmp_path / "c.png")])
    table = capsys.readouterr().out
    assert f"{low['best']:.2f} ± {low['best_std']:.2f}" in table and "2 finished, 1 failed" in table


@pytest.mark.slow
def test_by_seed_is_the_default_only_where_runs_differ_only_in_seed(sweep):
    everything = sweep_runs(sweep)
    assert view(*everything).by_seed and view(str(sweep)).differing == ["optim.lr"]
    each = view(*everything, "--each-run")
    assert not each.by_seed and each.differing == ["seed", "optim.lr"] and len(each.rows) == 5
    assert not view(everything[0], everything[2]).by_seed      # same seed, other lr: nothing to collapse
    one = view(*everything, "--where", "optim.lr=0.01")         # one group: its recipe names it
    assert one.by_seed and names(one) == ["debug"] and one.differing == []
    assert names(view(str(sweep), "--sort", "-optim.lr")) == ["optim.lr=0.05", "optim.lr=0.01"]
    assert names(view(*everything, "--each-run", "--where", "seed!=0", "--sort", "-seed")) == [
        FAILED, "01-optim.lr=0.01,seed=1", "03-optim.lr=0.05,seed=1"]


@pytest.mark.slow
def test_sweep_and_glob_arguments_find_the_listed_runs(sweep):
    everything = sweep_runs(sweep)
    assert [r.name for row in view(str(sweep), "--each-run").rows for r in row.runs] == \
        [os.path.basename(p) for p in sorted(everything)]
    assert names(view(str(sweep / "*seed=0"))) == names(view(everything[0], everything[2]))


@pytest.mark.slow
def test_seed_groups_are_drawn_as_a_band_around_the_mean(sweep):
    v = view(str(sweep))
    fig = compare_plot.figure(v.rows, v.plotted)
    for ax in fig.axes:
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(bands) == 2, ax.get_title()           # both groups have 2+ runs with data
        lines = lines_by_label(ax)
        for band, row in zip(bands, v.rows):
            assert np.allclose(band.get_facecolor()[0][:3], matplotlib_rgb(row.color))
            assert lines[row.label].get_color() == row.color
    low = v.rows[0]                                        # the mean of its two runs, per logged step
    per_run = [{r["step"]: r["train/loss"] for r in read_jsonl(os.path.join(run_.path, "metrics.jsonl"))
                if "train/loss" in r} for run_ in low.runs]
    mean = lines_by_label(fig.axes[4])[low.label]
    assert list(mean.get_xdata()) == sorted(per_run[0])
    assert np.allclose(mean.get_ydata(), [np.mean([p[s] for p in per_run]) for s in sorted(per_run[0])])
    assert "band min-max" in mean.get_label() and lines_by_label(fig.axes[4])["optim.lr=0.05"].get_linestyle() == "--"
    reordered = view(*reversed(sweep_runs(sweep)))
    assert {r.label: r.color for r in reordered.rows} == {r.label: r.color for r in v.rows}


def matplotlib_rgb(color: str):
    from matplotlib.colors import to_rgb
    return to_rgb(color)


def test_one_flatten_and_one_cell_for_the_whole_package():
    """compare keeps a null setting and an empty section (they differ from a key a run lacks); W&B rows and config
    diffs drop None. One function does both, and compare's table cells are the console's."""
    tree = {"a": {"b": None, "c": {}, "d": {"e": 1}}, "f": 2}
    assert nested.flatten(tree, ".") == {"a.d.e": 1, "f": 2}
    assert nested.flatten(tree, ".", keep_none=True) == {"a.b": None, "a.c": {}, "a.d.e": 1, "f": 2}
    assert nested.flatten({"test": {"acc": 1.0}}) == {"test/acc": 1.0}
    assert compare_runs.flatten is config_module.flatten is tracking.flatten is nested.flatten
    assert compare_output.cell is console.cell

