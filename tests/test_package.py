"""The project as a package a user installs: a wheel built from the tree carries every module, the recipes and sweep
files, and the six console scripts; installed (not editable) into a fresh venv, its commands run from an empty
folder, the recipes found by name inside the wheel, with no checkout on the path."""
import glob
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile

import pytest
import yaml
from conftest import ROOT
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from inprocess import entry, refusal

from cifar import evaluate_cli, predict_cli, shipped, sweep, train_cli
from cifar.config import load_config
from cifar.errors import UserError

SCRIPTS = ("cifar-train", "cifar-evaluate", "cifar-predict", "cifar-sweep", "cifar-compare", "cifar-export")


def tree_files(pattern: str) -> set[str]:
    """The tree's files under cifar/ matching a glob, as paths inside the wheel."""
    return {os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "cifar", pattern), recursive=True)}


def run(argv, cwd, **kw):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}   # no checkout on the path: the wheel's cifar
    return subprocess.run(argv, cwd=cwd, env={**env, "WANDB_MODE": "disabled", **kw}, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_the_wheel_carries_the_recipes_and_scripts_and_runs_installed_from_an_empty_folder(tmp_path):
    source = tmp_path / "src"        # a copy: building writes build/ and *.egg-info beside pyproject.toml
    shutil.copytree(os.path.join(ROOT, "cifar"), source / "cifar", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), source / name)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
                 "-w", str(tmp_path / "dist"), str(source)], tmp_path)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = glob.glob(str(tmp_path / "dist" / "*.whl"))

    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        entry_points = z.read(next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    recipes = tree_files("recipes/**/*.yaml")
    assert {"cifar/recipes/debug.yaml", "cifar/recipes/tutorial.yaml",
            "cifar/recipes/sweeps/debug-lr-seed.yaml"} <= recipes
    assert recipes <= names, sorted(recipes - names)                 # every recipe and sweep file, however many
    assert tree_files("*.py") <= names, sorted(tree_files("*.py") - names)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]
    assert tuple(declared["scripts"]) == SCRIPTS
    for script, target in declared["scripts"].items():
        assert f"{script} = {target}" in entry_points
    # ranges, not pins: a cluster's own torch stays; Pillow (predict reads images) declared; POSIX said
    assert not [d for d in declared["dependencies"] if "==" in d]
    assert any(d.lower().startswith("pillow") for d in declared["dependencies"])
    assert "Requires-Dist: torch<3,>=2" in metadata or "Requires-Dist: torch>=2" in metadata
    assert "Classifier: Operating System :: POSIX" in metadata

    # A venv of this interpreter that sees the installed dependencies (torch...) through a .pth line, but not the
    # project (an editable install's hook is in a .pth of that folder, which a .pth line does not run)
    venv = tmp_path / "venv"
    made = run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    assert made.returncode == 0, made.stderr[-3000:]
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path).stdout.strip()
    with open(os.path.join(site, "dependencies.pth"), "w") as f:
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    installed = run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
                     "-q", wheel], tmp_path)
    assert installed.returncode == 0, installed.stderr[-3000:]

    empty = tmp_path / "empty"
    empty.mkdir()
    where = run([python, "-c", "import json, cifar, importlib.metadata as m; print(json.dumps([cifar.__file__, "
                 "{e.name: e.load().__module__ for e in m.distribution('cifar-trainer').entry_points}]))"], empty)
    assert where.returncode == 0, where.stderr[-3000:]
    module_file, loaded = json.loads(where.stdout)
    assert module_file.startswith(site)                              # the wheel's copy, not the tree
    assert sorted(loaded) == sorted(SCRIPTS)                         # each script's function imports

    printed = run([venv / "bin" / "cifar-train", "--config", "debug", "--print-config"], empty)
    assert printed.returncode == 0, printed.stderr[-3000:]
    assert yaml.safe_load(printed.stdout) == load_config(os.path.join(ROOT, "configs", "debug.yaml")).to_dict()
    unknown = run([venv / "bin" / "cifar-train", "--config", "nope"], empty)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr[-3000:]
    assert "debug, " in unknown.stderr and "tutorial" in unknown.stderr   # the shipped names listed
    swept = run([venv / "bin" / "cifar-sweep", "debug-lr-seed", "--dry-run"], empty)   # its recipe by name too
    assert swept.returncode == 0, swept.stderr[-3000:]
    assert "sweep debug-lr-seed: 4 run(s)" in swept.stdout
    assert os.listdir(empty) == []                                   # printing and planning made nothing


# ----------------------------------------------------------------------------- in this process: names and aliases

def test_a_recipe_is_found_by_name_from_any_folder_and_a_path_still_works(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)                                      # no configs/ here
    by_path = load_config(os.path.join(ROOT, "configs", "debug.yaml"), ["optim.lr=0.2"]).to_dict()
    assert load_config("debug", ["optim.lr=0.2"]).to_dict() == by_path
    assert load_config("debug.yaml", ["optim.lr=0.2"]).to_dict() == by_path
    for name in shipped.names():                                     # every shipped recipe, one a helper adds too
        assert load_config(name).to_dict() == load_config(os.path.join(shipped.RECIPES, f"{name}.yaml")).to_dict()
    mine = tmp_path / "debug.yaml"                                   # a file of that name here is the user's
    mine.write_text("train: {epochs: 7}\n")
    assert load_config("debug.yaml").train.epochs == 7
    with pytest.raises(UserError, match="not found"):                # a path that names a folder is a path
        load_config("recipes/debug.yaml")


def test_an_unknown_recipe_name_is_one_line_listing_the_shipped_ones(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    line = refusal(capsys, "train.py", "--config", "resnet1000", "--print-config")
    listed = line.split("one of: ")[1].split(", ")
    assert "'resnet1000'" in line and listed == shipped.names() and "tutorial" in listed
    assert refusal(capsys, "train.py", "--config", "recipes/nope.yaml").endswith(
        "not found; pass an existing recipe, e.g. --config configs/debug.yaml")


def test_a_sweep_file_is_found_by_name_and_its_runs_recipe_too(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sweep.main(["debug-lr-seed", "--dry-run", "--runs-dir", "r"])
    out = capsys.readouterr().out
    assert "sweep debug-lr-seed: 4 run(s), method grid, recipe debug" in out and not os.listdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:
        sweep.main(["nope-sweep", "--dry-run"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.count("\n") == 1 and "debug-lr-seed" in err, err


def test_the_checkouts_scripts_are_aliases_of_the_console_scripts():
    for script, module in (("train", train_cli), ("evaluate", evaluate_cli), ("predict", predict_cli)):
        assert entry(f"{script}.py") is module.main
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert scripts["cifar-train"] == "cifar.train_cli:command" and scripts["cifar-sweep"] == "cifar.sweep:main"
    assert os.path.realpath(os.path.join(ROOT, "configs")) == shipped.RECIPES   # every configs/ path still works


def test_the_slurm_scripts_find_a_recipe_by_name_as_train_py_does():
    """sbatch slurm/train.sbatch debug, and a sweep whose command says --config debug (the shipped ones do): the
    scripts' check that the recipe exists (slurm/common.sh find_recipe) finds what --config finds."""
    names = ["debug.yaml", "configs/debug.yaml", "nope", "configs/nope.yaml", *shipped.names()]
    script = f"source slurm/common.sh; for r in {' '.join(names)}; do echo \"$r=$(find_recipe \"$r\")\"; done"
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines())
    assert {k: found[k] for k in names[:4]} == {"debug.yaml": "cifar/recipes/debug.yaml", "nope": "",
                                                "configs/debug.yaml": "configs/debug.yaml", "configs/nope.yaml": ""}
    assert all(found[name] == f"cifar/recipes/{name}.yaml" for name in shipped.names()), found


def test_the_constraints_pin_what_runs_here_within_the_declared_ranges():
    """constraints.txt (what CI and the benchmarks install) pins every declared dependency to a version inside its
    range in pyproject.toml, and that version is the one this suite is running with: the ranges' claim, tested
    against, holds at least there."""
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    with open(os.path.join(ROOT, "constraints.txt")) as f:
        pins = {canonicalize_name(name): version for name, version in
                (line.strip().split("==") for line in f if line.strip() and not line.startswith("#"))}
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in constraints.txt"
        assert req.specifier.contains(pins[name]), f"constraints.txt's {name}=={pins[name]} is outside {req}"
        assert importlib.metadata.version(req.name).split("+")[0] == pins[name], f"{name}: installed is not pinned"
