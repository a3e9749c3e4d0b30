"""README.md and docs/ stay true: every command they show names scripts, flags, recipes and config keys that exist;
every file path and config key they name in passing exists; CI runs the README's own install and test commands;
and the README's first commands run as written."""
import glob
import inspect
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib

import accelerate.commands.launch
import pytest
import yaml
from conftest import DEBUG, ROOT, env

from cifar import shipped, sweep_plan
from cifar.config import load_config
from cifar.errors import UserError

DOCS = [os.path.join(ROOT, "README.md"), *sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))),
        os.path.join(ROOT, "bench", "README.md")]
SECTIONS = ("model", "data", "optim", "schedule", "train", "checkpoint", "wandb")
MADE_BY_RUNS = ("bench/results",)        # git-ignored folders that runs create
with open(os.path.join(ROOT, "pyproject.toml"), "rb") as _f:   # cifar-train -> cifar/train_cli.py
    CONSOLE = {name: "cifar/" + target.split(":")[0].split(".")[1] + ".py"
               for name, target in tomllib.load(_f)["project"]["scripts"].items()}
NOT_OURS = {"pip", "squeue", "tail", "scontrol", "scancel", "wandb", "mkdir", "cd", "export", "ls", "cat", "sinfo"}


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def commands(path: str) -> list[str]:
    """The commands in a page's ```bash blocks: continuation lines joined, comments dropped, && and ; split."""
    found = []
    for block in re.findall(r"```(?:bash|sh|console)\n(.*?)```", read(path), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).strip()
            found += [part.strip() for part in re.split(r"&&|;", line) if part.strip()]
    return found


def is_override(token: str) -> bool:
    key = token.split("=", 1)[0]
    return "=" in token and not token.startswith("-") and (
        key in ("seed", "name", "output_dir") or key.split(".")[0] in SECTIONS)


def check_command(cmd: str) -> list[str]:
    """What is wrong with one documented command (empty when nothing is)."""
    argv = shlex.split(cmd)
    while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):        # VAR=value before the command
        argv = argv[1:]
    if not argv or argv[0] in NOT_OURS:
        return []
    problems, script, recipe, overrides = [], None, None, []
    if argv[0] in CONSOLE:                                                 # cifar-train ... as python train.py ...
        script, rest = CONSOLE[argv[0]], argv[1:]
    elif argv[0] == "python":
        if argv[1] == "-m":
            module, rest = argv[2], argv[3:]
            if module == "pytest":      # the paths must exist; -n and -m take a value
                paths = [a for i, a in enumerate(rest)
                         if not a.startswith("-") and (i == 0 or rest[i - 1] not in ("-n", "-m"))]
                return [] if all(os.path.exists(os.path.join(ROOT, a)) for a in paths) else \
                    [f"{cmd}: no such test path"]
            script = module.replace(".", "/") + ".py"
        else:
            script, rest = argv[1], argv[2:]
    elif argv[0:2] == ["accelerate", "launch"]:
        i = next((i for i, a in enumerate(argv) if a.endswith(".py") or a == "-m"), None)
        if i is None:
            return [f"{cmd}: no script"]
        source = inspect.getsource(accelerate.commands.launch)
        problems += [f"{cmd}: accelerate launch has no {a}" for a in argv[2:i]
                     if a.startswith("--") and f'"{a.split("=")[0]}"' not in source]
        if argv[i] == "-m":             # accelerate launch -m cifar.train_cli ...
            script, rest = argv[i + 1].replace(".", "/") + ".py", argv[i + 2:]
        else:
            script, rest = argv[i], argv[i + 1:]
    elif argv[0] == "torchrun":             # its options, then the script and the script's own arguments
        i = next((i for i, a in enumerate(argv) if a.endswith(".py")), None)
        if i is None:
            return [f"{cmd}: no script"]
        script, rest = argv[i], argv[i + 1:]
    elif argv[0] == "sbatch":
        i = next(i for i, a in enumerate(argv[1:], 1) if not a.startswith("-"))
        script, rest = argv[i], argv[i + 1:]
        if rest and not is_override(rest[0]) and not rest[0].startswith("configs/sweeps/"):
            recipe, rest = rest[0], rest[1:]
    elif argv[0] == "bash":
        script, rest = argv[1], argv[2:]
    else:
        return [f"{cmd}: unknown command {argv[0]!r}; add it to NOT_OURS if it is not the project's"]
    if not os.path.isfile(os.path.join(ROOT, script)):
        return [f"{cmd}: no file {script}"]
    source = read(os.path.join(ROOT, script))
    alias = re.search(r"^from cifar\.(\w+) import main$", source, re.M)
    if alias:                              # train.py and the others: aliases of cifar/<name>_cli.py's main
        script = f"cifar/{alias.group(1)}.py"
        source = read(os.path.join(ROOT, script))
    sweeps = script in ("slurm/sweep.sbatch", "cifar/sweep.py")
    if script == "slurm/sweep.sbatch":     # its options after the sweep file are cifar.sweep's
        source += read(os.path.join(ROOT, "cifar", "sweep.py"))
    # flags that an entry point takes from a shared helper (trained.add_run_arguments): the modules it imports
    for module in re.findall(r"^from (?:cifar\.|\.)(\w+) import", source, re.M):
        if os.path.isfile(os.path.join(ROOT, "cifar", f"{module}.py")):
            source += read(os.path.join(ROOT, "cifar", f"{module}.py"))
    if script.startswith("bench/") and script.endswith(".py"):    # their own --config default, else common's
        source += read(os.path.join(ROOT, "bench", "common.py"))
        own = re.search(r'parser\(__doc__, "([^"]+)"\)', source)
        recipe = own.group(1) if own else re.search(r'config: str = "([^"]+)"', source).group(1)
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg.startswith("--") and not is_override(arg[2:]):
            flag = arg.split("=")[0]
            if f'"{flag}"' not in source:
                problems.append(f"{cmd}: {script} has no flag {flag}")
            if flag == "--config" and "=" not in arg:
                recipe, i = rest[i + 1], i + 1
        elif is_override(arg.lstrip("-")):
            overrides.append(arg.lstrip("-"))
        elif arg.startswith("configs/") and not os.path.exists(os.path.join(ROOT, arg)):
            problems.append(f"{cmd}: no file {arg}")
        elif arg.startswith("configs/sweeps/") or (sweeps and not arg.startswith("-") and i == 0):
            try:                    # a sweep file or a shipped sweep's name: every run it makes must be valid
                path = os.path.join(ROOT, arg)
                sweep_plan.plan(sweep_plan.read_sweep(path if os.path.isfile(path) else shipped.sweep_path(arg)),
                                "runs")
            except Exception as e:  # noqa: BLE001
                problems.append(f"{cmd}: {e}")
        i += 1
    if recipe is not None:                  # a file of the checkout, or a shipped recipe's name (--config debug)
        path = os.path.join(ROOT, recipe)
        try:
            found = path if os.path.isfile(path) else shipped.recipe_path(recipe)
        except UserError:
            found = None
        if found is None or not os.path.isfile(found):
            return problems + [f"{cmd}: no recipe {recipe}"]
        recipe = found
    if overrides or recipe:
        try:
            load_config(recipe, overrides)
        except Exception as e:  # noqa: BLE001 - any refusal is the finding
            problems.append(f"{cmd}: {e}")
    return problems


def config_keys() -> set[str]:
    def walk(d, prefix=""):
        for k, v in d.items():
            yield from walk(v, f"{prefix}{k}.") if isinstance(v, dict) else [f"{prefix}{k}"]
    return set(walk(load_config().to_dict()))


@pytest.mark.parametrize("page", DOCS, ids=os.path.basename)
def test_documented_commands_name_what_exists(page):
    found = commands(page)
    problems = [p for cmd in found for p in check_command(cmd)]
    assert problems == []


def named_in_passing(text: str) -> list[str]:
    """Config keys and project paths named in inline `code` outside code blocks that do not exist."""
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    keys, problems = config_keys(), []
    for span in spans:
        for word in re.findall(r"[\w./<>*-]+", span):
            word = word.rstrip(".,:")
            if re.match(r"(configs|cifar|bench|slurm|docs|tests)/", word):
                if not re.search(r"[<*]", word) and not word.startswith(MADE_BY_RUNS) \
                        and not os.path.exists(os.path.join(ROOT, word)):
                    problems.append(f"path {word}")
            elif re.search(r"\.(py|yaml|sh|md|sbatch|json|jsonl|png|pt|pth|safetensors|out)$", word):
                pass                                                  # a file name such as train.py
            elif word.split(".")[0] in SECTIONS and "." in word and "/" not in word and "<" not in word:
                if word not in keys and not any(k.startswith(word + ".") for k in keys):
                    problems.append(f"config key {word}")
    return problems


@pytest.mark.parametrize("page", DOCS, ids=os.path.basename)
def test_paths_and_config_keys_named_in_passing_exist(page):
    assert named_in_passing(read(page)) == []


def test_the_checkers_catch_what_does_not_exist():
    assert named_in_passing("set `train.epoch` in `configs/nope.yaml`, see `cifar/enginee.py`") == [
        "config key train.epoch", "path configs/nope.yaml", "path cifar/enginee.py"]
    assert named_in_passing("`train.epochs: 3` in `configs/debug.yaml` (`model.name=fastnet`)") == []
    assert check_command("python train.py --config configs/nope.yaml")
    assert check_command("python train.py --config configs/debug.yaml optim.lrr=0.1")
    assert check_command("python evaluate.py --checkpoint runs/<run> --pikc best")
    assert check_command("python predict.py --checkpoint runs/<run> cat.png --topk 3")
    assert not check_command("python predict.py --checkpoint runs/<run> cat.png --top-k 3 --pick best")
    assert not check_command("python -m cifar.export --checkpoint runs/<run> --format pt2 --pick best")
    assert check_command("accelerate launch --multi_gpus train.py")
    assert check_command("sbatch slurm/nope.sbatch configs/debug.yaml")
    assert check_command("python -m cifar.sweep configs/sweeps/nope.yaml --dry-run")
    assert check_command("python -m cifar.sweep configs/sweeps/debug-lr-seed.yaml --nope")
    assert not check_command("python -m cifar.sweep configs/sweeps/debug-lr-seed.yaml --parallel 2")
    assert not check_command("sbatch --array=0-3 slurm/sweep.sbatch configs/sweeps/debug-lr-seed.yaml --seed=1")
    assert check_command("sbatch --array=0-3 slurm/sweep.sbatch configs/sweeps/debug-lr-seed.yaml --nope=1")
    assert check_command("python -m pytest -q -n 2 tests/test_nope.py")
    # the console scripts are checked as the scripts they alias; recipes and sweeps by their shipped names too
    assert not check_command("cifar-train --config debug optim.lr=0.1 --print-config")
    assert check_command("cifar-train --config nope")
    assert check_command("cifar-train --config debug optim.lrr=0.1")
    assert check_command("cifar-train --config debug --nope")
    assert check_command("cifar-evaluate --checkpoint runs/<run> --pikc best")
    assert not check_command("cifar-evaluate --checkpoint runs/<run> --pick best --tta")
    assert not check_command("cifar-predict --checkpoint runs/<run> cat.png --top-k 3")
    assert check_command("cifar-predict --checkpoint runs/<run> cat.png --topk 3")
    assert not check_command("cifar-export --checkpoint runs/<run> --format pt2")
    assert not check_command("cifar-compare runs/debug-lr-seed --sort best")
    assert check_command("cifar-compare runs/debug-lr-seed --nope")
    assert not check_command("cifar-sweep debug-lr-seed --dry-run")
    assert check_command("cifar-sweep nope-sweep --dry-run")
    assert check_command("cifar-sweep debug-lr-seed --nope")
    assert not check_command("accelerate launch --multi_gpu --num_processes 2 -m cifar.train_cli --config debug")
    assert check_command("accelerate launch --multi_gpu --num_processes 2 -m cifar.train_cli --config nope")
    assert not check_command('python -m pytest -q -n 2 tests -m "not slow"')
    assert not check_command("accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint runs/<run>")
    assert not check_command("CPU=1 sbatch --gpus-per-node=0 slurm/train.sbatch configs/debug.yaml optim.lr=0.1")


def test_ci_runs_the_readme_install_and_test_commands():
    readme, ci = read(DOCS[0]), read(os.path.join(ROOT, ".ci", "run"))
    quick = commands(DOCS[0])[:3]
    install = next(c for c in quick if c.startswith("pip install"))
    test = next(c for c in quick if c.startswith("python -m pytest"))
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.strip().startswith("#")]
    assert ci_lines[-1] == test, "the last line of .ci/run must be README's test command, exactly"
    assert f"python -m {install}" in [line.replace("--quiet ", "").replace("-c constraints.txt ", "")
                                      for line in ci_lines], "CI must install the way README says"
    assert any(line.startswith("python -m pip install") and "-c constraints.txt" in line for line in ci_lines), \
        "CI must install the exact versions of constraints.txt"
    assert os.path.isfile(os.path.join(ROOT, "constraints.txt"))
    assert "pytest" in read(os.path.join(ROOT, "pyproject.toml")).split("[project.optional-dependencies]")[1]
    assert len(readme.encode()) <= 12_000, f"README.md is {len(readme.encode())} bytes; move depth to docs/"


@pytest.mark.slow
def test_readme_first_commands_run_as_written(tmp_path, baseline):
    """`python train.py --config configs/debug.yaml`, then evaluate.py and cifar.compare on the run it made, in a
    folder laid out like the project's, the way a newcomer types them. The run is the shared debug baseline: the
    written command's own, as its --print-config shows, but for saving and logging more often."""
    found = commands(DOCS[0])
    wanted = ["python train.py --config configs/debug.yaml", "python evaluate.py --checkpoint runs/<run>"]
    assert all(c in found for c in wanted), found
    compare = next(c for c in found if c.startswith("python -m cifar.compare"))
    for name in ("train.py", "evaluate.py", "configs"):
        os.symlink(os.path.join(ROOT, name), tmp_path / name)

    def run(cmd):
        argv = shlex.split(cmd)
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, env=env(), capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, f"{cmd}\n{proc.stderr[-3000:]}"
        return proc

    written = yaml.safe_load(run(f"{wanted[0]} --print-config").stdout)
    assert sorted(os.listdir(tmp_path)) == ["configs", "evaluate.py", "train.py"]   # --print-config made nothing
    assert DEBUG == (*shlex.split(wanted[0])[2:], "checkpoint.every_steps=8", "train.log_every_steps=4")
    trained = baseline(*DEBUG)
    config = yaml.safe_load((trained / "config.yaml").read_text())
    assert config["output_dir"] == str(trained) and written["output_dir"] is None
    assert (config["checkpoint"]["every_steps"], config["train"]["log_every_steps"]) == (8, 4)
    config["output_dir"] = None
    config["checkpoint"]["every_steps"] = written["checkpoint"]["every_steps"]
    config["train"]["log_every_steps"] = written["train"]["log_every_steps"]
    assert config == written
    made = f"debug-{trained.name}"
    shutil.copytree(trained, tmp_path / "runs" / made)    # evaluate writes beside the weights: the baseline stays
    assert "Accuracy of the network" in run(wanted[1].replace("<run>", made)).stdout
    run(shlex.join([a for a in shlex.split(compare) if not a.startswith("runs/")] + [f"runs/{made}"]))
    shutil.rmtree(tmp_path / "runs")
