"""Hostile input stays bounded: a YAML alias bomb, deep nesting and megabyte values are refused in one short line
(exit 2) wherever YAML is read; a sweep's grid is never expanded beyond the runs asked for; writes replace only
regular files and honour the umask; and every "wrote X" names the file written."""
from __future__ import annotations

import glob
import importlib.util
import itertools
import json
import os
import stat
import subprocess
import sys
import tracemalloc
import types

import pytest
import torch
import yaml
from PIL import Image

from cifar import compare, compare_plot, export, yaml_io
from cifar import sweep as sw
from cifar import sweep_plan as sp
from cifar.config import DataConfig, load_config
from cifar.data import DeviceBatches, synthetic_split
from cifar.errors import UserError, shorten
from cifar.files import write_atomic
from cifar.models import build_model
from cifar.predict_cli import predict_images
from conftest import ROOT, env
from inprocess import call
from test_sweep import sweep_file


def alias_bomb(levels: int = 9, width: int = 9) -> str:
    """'Billion laughs': level i lists `width` references to level i - 1, so the last one is width**levels values."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def as_flow(block: str) -> str:
    """The same mapping on one line, as an override value is written."""
    return "{" + ", ".join(block.splitlines()) + "}"


def entry(script: str):
    """The main(argv) of train.py / predict.py, imported as a module (they live beside the package, not in it)."""
    spec = importlib.util.spec_from_file_location(script[:-3], os.path.join(ROOT, script))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def one_line_exit_2(capsys, main, *argv) -> str:
    """Run an entry point in-process; it must exit 2 with one short `error:` line on stderr. Returns the line."""
    with pytest.raises(SystemExit) as exit_:
        main(list(argv))
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and len(err) < 300, err[:1000]
    return err


def peak_bytes(call) -> int:
    """Peak Python memory allocated while `call` runs (tracemalloc), whatever it raises."""
    tracemalloc.start()
    try:
        call()
    except (UserError, SystemExit):
        pass
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


# ----------------------------------------------------------------------------- YAML

def leaves(node, seen=None) -> int:
    """How many values a YAML document expands to, counting each shared (aliased) list once per reference."""
    seen = {} if seen is None else seen
    if not isinstance(node, list):
        return 1
    if id(node) not in seen:
        seen[id(node)] = sum(leaves(item, seen) for item in node)
    return seen[id(node)]


def test_the_bomb_is_what_it_claims():
    """The refused document really is the billion laughs: nine levels of nine, 387 million values, in under 2 KB.
    (PyYAML itself builds it cheaply, sharing each aliased list; what expands it is whoever walks it.)"""
    bomb = alias_bomb()
    assert len(bomb) < 2048 and leaves(yaml.safe_load(bomb)["a8"]) == 9 ** 9 == 387_420_489
    assert yaml_io.safe_load(alias_bomb(levels=2), "a small one")["a1"] == [["lol"] * 9] * 9   # aliases still work


def test_alias_bomb_as_an_override_is_one_line(capsys):
    train = entry("train.py")
    err = one_line_exit_2(capsys, train, f"optim.lr={as_flow(alias_bomb())}", "--print-config")
    assert "override 'optim.lr' expands to more than 100,000 values" in err
    assert peak_bytes(lambda: train([f"optim.lr={as_flow(alias_bomb())}", "--print-config"])) < 20 << 20


def test_alias_bomb_as_a_recipe_is_one_line(tmp_path, capsys):
    recipe = tmp_path / "bomb.yaml"
    recipe.write_text(alias_bomb())
    err = one_line_exit_2(capsys, entry("train.py"), "--config", str(recipe), "--print-config")
    assert f"config file {recipe} expands to more than 100,000 values" in err
    assert peak_bytes(lambda: load_config(str(recipe))) < 20 << 20


def test_alias_bomb_as_a_run_folders_config_is_one_line_in_compare(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(alias_bomb())
    err = one_line_exit_2(capsys, compare.main, str(tmp_path / "run"))
    assert f"{tmp_path / 'run' / 'config.yaml'} expands to more than 100,000 values" in err
    assert peak_bytes(lambda: compare.main([str(tmp_path / "run")])) < 20 << 20


@pytest.mark.parametrize("value", ["[" * 5000 + "]" * 5000, "{a: " * 5000 + "1" + "}" * 5000, "&a [*a]"],
                         ids=["lists", "mappings", "itself"])
def test_deep_nesting_is_one_line(value, capsys):
    err = one_line_exit_2(capsys, entry("train.py"), f"optim.lr={value}", "--print-config")
    assert "override 'optim.lr' nests deeper than 100 levels" in err


def test_a_key_of_thousands_of_parts_is_one_line(capsys):
    err = one_line_exit_2(capsys, entry("train.py"), ".".join(["optim"] * 5000) + "=1", "--print-config")
    assert "has 5,000 parts" in err


def test_text_is_capped_before_parsing(tmp_path, capsys):
    train = entry("train.py")
    err = one_line_exit_2(capsys, train, "wandb.notes=" + "x" * (yaml_io.VALUE_CHARS + 1), "--print-config")
    assert "override 'wandb.notes' is longer than 65,536 characters" in err
    big = tmp_path / "big.yaml"
    big.write_text("name: big\n" + "# padding\n" * (yaml_io.FILE_CHARS // 10))
    err = one_line_exit_2(capsys, train, "--config", str(big), "--print-config")
    assert f"config file {big} is longer than 1,048,576 characters" in err


def test_nesting_and_size_within_the_limits_still_read(monkeypatch):
    deep = "[" * yaml_io.MAX_DEPTH + "]" * yaml_io.MAX_DEPTH
    value = yaml_io.safe_load(deep, "x")
    for _ in range(yaml_io.MAX_DEPTH - 1):           # MAX_DEPTH lists, each holding the next, the last one empty
        (value,) = value
    assert value == []
    with pytest.raises(UserError, match="nests deeper"):
        yaml_io.safe_load("[" + deep + "]", "x")
    monkeypatch.setattr(yaml_io, "MAX_NODES", 1000)   # the boundary, without parsing 100,000 values
    assert len(yaml_io.safe_load("[" + "1, " * 998 + "1]", "x")) == 999      # the list and its 999 items
    with pytest.raises(UserError, match="expands to more than 1,000 values"):
        yaml_io.safe_load("[" + "1, " * 999 + "1]", "x")


def test_a_value_yaml_cannot_construct_is_one_line(capsys):
    err = one_line_exit_2(capsys, entry("train.py"), "optim.lr=" + "1" * 5000, "--print-config")
    assert "override 'optim.lr' holds a value YAML cannot read" in err


# ----------------------------------------------------------------------------- messages

def test_shorten_cuts_long_values_and_says_how_long():
    assert shorten("abc") == "'abc'" and shorten([1, {"a": (2,)}]) == "[1, {'a': (2,)}]" and shorten(0.5) == "0.5"
    text = shorten("x" * 10 ** 6)
    assert text.endswith("... (1,000,000 characters)") and len(text) < 120
    assert shorten(list(range(10 ** 6))).endswith("... (1,000,000 items)")


@pytest.mark.parametrize("override", ["optim.lr=", "optim.name=", "train.compile=", "data.batch_size=",
                                      "model.name=", "data.limit_train=", "x" * 100 + "="])
def test_a_megabyte_value_makes_a_short_message(override, capsys):
    """Every refusal that repeats the value cuts it: a 60,000-character string (under the override cap), a
    5,000-item list, and a megabyte (over the cap)."""
    train = entry("train.py")
    for value in ("v" * 60_000, "[" + "1, " * 5_000 + "1]", "v" * 2 ** 20):
        one_line_exit_2(capsys, train, override + value, "--print-config")


def test_a_long_value_in_a_file_makes_a_short_message(tmp_path, capsys):
    """The same from a recipe and from a sweep file: the value is cut, the line stays short. (300,000 characters:
    PyYAML's pure-Python scanner takes seconds over a megabyte, and the message does not depend on the length.)"""
    big = "x" * 300_000
    recipe = tmp_path / "big.yaml"
    recipe.write_text(f"model: {{name: {big}}}\n")
    err = one_line_exit_2(capsys, entry("train.py"), "--config", str(recipe), "--print-config")
    assert "config key 'model.name' must be one of" in err and "(300,000 characters)" in err
    err = one_line_exit_2(capsys, sw.main, sweep_file(tmp_path, program=big))
    assert "program must be train.py; got 'xxx" in err and "(300,000 characters)" in err


# ----------------------------------------------------------------------------- sweeps

HUGE = {f"p{i}": list(range(10)) for i in range(8)}   # 10^8 points; p0 slowest


def huge_sweep(folder, run_cap: int | None = 3, parameters=None, **top) -> str:
    """A sweep file over TINY's recipe whose grid has 10^8 points (parameters: train.py keys, 10 values each)."""
    keys = ["seed", "optim.lr", "optim.momentum", "train.epochs", "data.batch_size", "train.label_smoothing",
            "optim.weight_decay", "train.log_every_steps"]
    values = [list(range(10)), [0.01 * (i + 1) for i in range(10)], [0.05 * i for i in range(10)],
              list(range(1, 11)), list(range(1, 11)), [0.05 * i for i in range(10)], [0.01 * i for i in range(10)],
              list(range(1, 11))]
    grid = {k: {"values": v} for k, v in zip(keys, values)}
    return sweep_file(folder, parameters or grid, run_cap=run_cap, **top)


def test_a_grid_of_10_to_the_8_with_run_cap_3_is_three_runs_in_little_memory(tmp_path):
    path = huge_sweep(tmp_path)
    tracemalloc.start()
    runs = sp.plan(sp.read_sweep(path), str(tmp_path / "runs"))
    listed = list(runs)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20, peak   # the eager list was 10^8 dicts
    sweep = sp.read_sweep(path)
    first = list(itertools.islice(itertools.product(*(s["values"] for s in sweep.parameters.values())), 3))
    assert len(runs) == 3 and [tuple(r.params.values()) for r in listed] == first
    assert [os.path.basename(r.folder) for r in listed] == [f"0{i}-train.log_every_steps={i + 1}" for i in range(3)]


def test_a_grid_of_10_to_the_8_counts_indexes_and_prints_its_array_without_listing(tmp_path, capsys, monkeypatch):
    # the up-front config check of the first runs (test_a_later_run_with_a_bad_config_fails_alone_without_starting)
    # is beside the point here, and under tracemalloc 100 of them take seconds
    monkeypatch.setattr(sp, "CHECKED_AHEAD", 3)
    path = huge_sweep(tmp_path, run_cap=None)
    tracemalloc.start()
    sw.main([path, "--slurm"])
    sw.main([path, "--index", "99999999", "--print-args"])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20, peak
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"mkdir -p runs && sbatch --array=0-99999999 slurm/sweep.sbatch {path}"
    assert "seed=9" in out and "train.log_every_steps=10" in out   # the last point: every parameter's last value
    assert out[-1].startswith("output_dir=runs/tiny/99999999-seed=9,optim.lr=0.1,")


def test_a_large_dry_run_lists_the_first_runs_and_counts_the_others(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sw, "LISTED", 4)
    # a short --runs-dir: the table's cells do not fold the folder names (a dry run creates nothing there)
    sw.main([huge_sweep(tmp_path, run_cap=10), "--dry-run", "--runs-dir", "r"])
    out = capsys.readouterr().out
    assert out.startswith("sweep tiny: 10 run(s)") and "... and 6 more run(s), not listed" in out
    assert "03-train.log_every_steps=4" in out and "train.log_every_steps=5" not in out


@pytest.mark.parametrize("cap", [1, 2, 3, 4, 5, 9, 10, 11, 25, None])
def test_folder_names_are_the_eager_lists(cap, tmp_path):
    """The parameters named in folders are those that vary within the runs made, as when the list was built whole."""
    grid = {"optim.lr": {"values": [0.01, 0.02, 0.01]}, "seed": {"values": [0, 1, 2]},
            "optim.momentum": {"values": [0.9, 0.9]}, "train.epochs": {"values": [1, 2]}}
    sweep = sp.read_sweep(sweep_file(tmp_path, grid, run_cap=cap))
    points = [dict(zip(grid, combo)) for combo in itertools.product(*(s["values"] for s in grid.values()))]
    points = points[:cap] if cap else points
    eager = [k for k in grid if len({json.dumps(p[k]) for p in points}) > 1]
    assert sp.varying(sweep) == eager
    assert [r.params for r in sp.plan(sweep, "runs")] == points
    assert [sp.point(sweep, i) for i in range(len(points))] == points


def test_random_search_draws_only_run_cap_points(tmp_path, monkeypatch):
    monkeypatch.setattr(sp, "CHECKED_AHEAD", 3)      # as above: drawing, not checking, is the subject
    parameters = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 0.1},
                  "optim.momentum": {"values": [0.9]}, "seed": {"distribution": "int_uniform", "min": 0, "max": 9}}
    sweep = sp.read_sweep(sweep_file(tmp_path, parameters, method="random", run_cap=10 ** 8))
    tracemalloc.start()
    runs = sp.plan(sweep, "runs")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20 and len(runs) == 10 ** 8 and sp.varying(sweep) == ["optim.lr", "seed"]
    assert runs[3].params == list(itertools.islice(runs, 4))[3].params


def test_a_later_run_with_a_bad_config_fails_alone_without_starting(tmp_path, capsys, monkeypatch):
    """Beyond the runs checked up front, a run whose config does not check is refused when it is reached: by
    --index in one line, by the runner as a failure that starts nothing."""
    monkeypatch.setattr(sp, "CHECKED_AHEAD", 2)
    path = sweep_file(tmp_path, {"optim.lr": {"values": [0.1, 0.2, -1.0]}})
    runs = sp.plan(sp.read_sweep(path), str(tmp_path / "runs"))   # runs 0 and 1 check
    assert runs[2].problem.endswith("config key 'optim.lr' must be > 0; got -1.0")
    err = one_line_exit_2(capsys, sw.main, path, "--index", "2", "--print-args")
    assert "run 2 (optim.lr=-1)" in err
    results = sw.Runner([runs[2]], 1, None).run()
    assert results == {2: ("failed (config)", runs[2].problem)} and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_the_dry_run_of_a_huge_grid_adds_little_to_the_process(tmp_path):
    """A process: what `python -m cifar.sweep HUGE --dry-run` holds beyond its imports (torch's, most of it)."""
    script = ("import resource, sys\nimport cifar.sweep as sw\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "sw.main([sys.argv[1], '--dry-run', '--runs-dir', sys.argv[2]])\n")
    script = script.replace("sw.main(", "try:\n    sw.main(").replace("])\n", "])\nfinally:\n    print('rss', before, "
                                                                         "resource.getrusage(resource.RUSAGE_SELF)"
                                                                         ".ru_maxrss, file=sys.stderr)\n")
    proc = subprocess.run([sys.executable, "-c", script, huge_sweep(tmp_path), str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, after = map(int, proc.stderr.split("rss ")[1].split())
    assert after - before < 50 << 10, (before, after)   # KiB: the eager list ran out of memory
    assert "sweep tiny: 3 run(s)" in proc.stdout


# ----------------------------------------------------------------------------- writes

@pytest.fixture
def tutorial_pth(tmp_path) -> str:
    """A bare state_dict of the tutorial's Net, as its notebook saves one: a checkpoint export and predict take."""
    path = str(tmp_path / "cifar_net.pth")
    torch.save(build_model("tutorial_net").state_dict(), path)
    return path


def fingerprint(path) -> tuple:
    st = os.lstat(path)
    return st.st_ino, stat.S_IFMT(st.st_mode), st.st_mtime_ns


@pytest.mark.parametrize("kind", ["fifo", "folder", "link to a fifo"])
def test_export_onto_anything_but_a_file_is_refused_and_left_alone(kind, tmp_path, tutorial_pth, capsys):
    target = tmp_path / "target"
    if kind == "folder":
        target.mkdir()
    else:
        os.mkfifo(tmp_path / "fifo")
        target = tmp_path / "fifo" if kind == "fifo" else target
        if kind == "link to a fifo":
            target.symlink_to(tmp_path / "fifo")
    before = fingerprint(target), fingerprint(os.path.realpath(target))
    err = one_line_exit_2(capsys, export.main, "--checkpoint", tutorial_pth, "--format", "tutorial",
                          "--output", str(target))
    assert "a folder" in err if kind == "folder" else "is a FIFO (named pipe), which is left as it is" in err
    assert (fingerprint(target), fingerprint(os.path.realpath(target))) == before
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []


def test_write_atomic_refuses_a_character_device(tmp_path):
    """/dev/null is only stat'ed: the refusal comes before any file is created beside it."""
    with pytest.raises(UserError, match="/dev/null is a character device, which is left as it is"):
        write_atomic("/dev/null", b"x")


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_are_created_as_the_umask_says(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        write_atomic(str(tmp_path / "new.json"), b"{}")
        (tmp_path / "old.json").write_bytes(b"old")
        os.chmod(tmp_path / "old.json", 0o600)
        write_atomic(str(tmp_path / "old.json"), b"new")   # replaced: the umask's mode too
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == mode
    assert stat.S_IMODE(os.stat(tmp_path / "old.json").st_mode) == mode
    assert (tmp_path / "old.json").read_bytes() == b"new"


@pytest.mark.parametrize("given, written", [("grid", "grid.png"), ("grid.png", "grid.png"),
                                            ("shots", "shots/predictions.png"), ("grid.v2", "grid.v2.png")])
def test_predict_grid_prints_the_name_it_wrote(given, written, tmp_path, tutorial_pth, capsys):
    (tmp_path / "shots").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "red.png")
    assert predict_images(tutorial_pth, [str(tmp_path / "red.png")], [], grid=str(tmp_path / given)) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / written}\n" in out
    assert Image.open(tmp_path / written).format == "PNG"
    pngs = {os.path.relpath(p, tmp_path) for p in glob.glob(str(tmp_path / "**" / "*.png*"), recursive=True)}
    assert pngs == {"red.png", written}   # that one file, and no other name beside it


def test_compare_writes_the_name_it_prints(tmp_path):
    """compare --output NAME (no extension): the PNG is NAME, as printed, not NAME.png."""
    from matplotlib.figure import Figure

    compare_plot.save(Figure(), str(tmp_path / "curves"))
    assert Image.open(tmp_path / "curves").format == "PNG" and not (tmp_path / "curves.png").exists()


# ----------------------------------------------------------------------------- batches

def test_a_device_batch_larger_than_the_training_set_is_one_line(tmp_path, capsys):
    err = one_line_exit_2(capsys, entry("train.py"), "--config", "configs/debug.yaml", "data.loader=device",
                          "data.limit_train=3", "data.batch_size=8", f"output_dir={tmp_path / 'run'}")
    assert "data.batch_size 8 x 1 process(es) = 8 images per step, more than the training set's 3" in err


def test_the_device_check_counts_every_process():
    two = types.SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=2)
    split = synthetic_split(15, True)
    with pytest.raises(UserError, match="data.batch_size 8 x 2 process.es. = 16 images per step, more than the "
                                        "training set's 15"):
        DeviceBatches(two, split, DataConfig(batch_size=8), True, seed=0)
    assert len(DeviceBatches(two, synthetic_split(16, True), DataConfig(batch_size=8), True, seed=0)) == 1
    assert len(DeviceBatches(two, split, DataConfig(batch_size=8), False, seed=0)) == 1   # the test split: partial


def test_the_dataloader_path_trains_on_a_partial_batch(tmp_path):
    """The DataLoader keeps the last partial batch: 3 images with data.batch_size=8 are one step, not a refusal."""
    call("train.py", "--config", "configs/debug.yaml", "data.limit_train=3", "data.limit_test=8", "data.batch_size=8",
         "train.epochs=1", f"output_dir={tmp_path / 'run'}", "wandb.mode=disabled")
    assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 1
