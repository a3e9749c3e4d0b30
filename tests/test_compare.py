"""python -m cifar.compare on real run folders: the table, the PNG, and one line + exit 2 for bad input."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from cifar.compare import load_run
from conftest import ROOT, env, run

RECIPES = {  # three small real runs, ~5 s each on one core; the last one loses its summary.json
    "sgd-slow": ["optim.lr=0.01"],
    "sgd-fast": ["optim.lr=0.05"],
    "adamw-cut": ["optim.name=adamw", "optim.lr=0.003"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")

    def train(item):
        name, overrides = item
        run("train.py", "--config", "configs/debug.yaml", "data.limit_train=384", "data.limit_test=256",
            "train.epochs=4", *overrides, f"output_dir={root / name}")

    with ThreadPoolExecutor(len(RECIPES)) as pool:
        list(pool.map(train, RECIPES.items()))
    os.remove(root / "adamw-cut" / "summary.json")  # as if it were still running, or had crashed
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
    assert "finished" in lines["sgd-slow"] and "incomplete" in lines["adamw-cut"]
    assert "tutorial_net" in lines["sgd-fast"] and "debug" in lines["sgd-fast"]
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
    r = load_run(str(tmp_path))
    assert r.summary is None and len(r.epochs()) == 3
    steps, seconds, values = r.curve("test/acc")
    assert steps.tolist() == [10, 20, 30] and seconds.tolist() == [2.0, 5.0, 6.0] and values.tolist() == [10, 21, 30]
    steps, seconds, values = r.curve("train/loss")
    assert steps.tolist() == [10] and seconds.tolist() == [2.0]
