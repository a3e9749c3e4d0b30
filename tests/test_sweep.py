"""python -m cifar.sweep: the list of runs a sweep file makes, its bad inputs (one line, exit 2, nothing started), and
real sweeps of train.py runs: a rerun skips finished runs, a sweep killed with -9 resumes to the weights of an
uninterrupted one, a failing run does not stop the others."""
from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from cifar import run_folder
from cifar import sweep as sw
from cifar import sweep_plan as sp
from cifar.config import load_config, parse_overrides
from conftest import ROOT, env, lock_held_by_child, weights

# 16 steps a run; logged every 4 so that test_compare's curves of these runs have points to average
TINY = ["--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=128", "train.epochs=2",
        "checkpoint.every_steps=2", "train.log_every_steps=4"]


def sweep_file(folder, parameters=None, command=None, **top) -> str:
    """A sweep file as a user writes it (YAML block lists: `${args}` cannot sit in a [flow] list)."""
    doc = sweep_doc(parameters, command, **top)
    path = os.path.join(folder, f"{doc.get('name', 'sweep')}.yaml")
    with open(path, "w") as f:
        f.write(as_yaml(doc))
    return path


def as_yaml(doc: dict) -> str:
    return yaml.safe_dump({k: v for k, v in doc.items() if v is not None}, sort_keys=False)


def sweep_doc(parameters=None, command=None, **top) -> dict:
    """The sweep file's content: by default a 2 x 2 grid (optim.lr x seed) on TINY."""
    doc = {"name": "tiny", "program": "train.py", "method": "grid",
           "command": command if command is not None else ["${env}", "${interpreter}", "${program}", *TINY,
                                                           "${args_no_hyphens}"],
           "parameters": parameters if parameters is not None else {"optim.lr": {"values": [0.01, 0.05]},
                                                                    "seed": {"values": [0, 1]}}}
    doc.update(top)
    return doc


def sweep_cli(*args, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cifar.sweep", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env(**kw), cwd=ROOT, stdin=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- the list of runs

def test_grid_order_folders_and_arguments(tmp_path):
    runs = sp.plan(sp.read_sweep(sweep_file(tmp_path)), str(tmp_path / "runs"))
    names = [os.path.relpath(r.folder, tmp_path / "runs") for r in runs]
    assert names == ["tiny/00-optim.lr=0.01,seed=0", "tiny/01-optim.lr=0.01,seed=1",
                     "tiny/02-optim.lr=0.05,seed=0", "tiny/03-optim.lr=0.05,seed=1"]
    cfg = load_config(runs[2].args[1], runs[2].args[2:])
    assert cfg.optim.lr == 0.05 and cfg.seed == 0 and cfg.data.limit_train == 256 and cfg.name == "debug"
    assert cfg.output_dir == runs[2].folder and cfg.wandb.group == "tiny"
    assert cfg.wandb.tags == ["optim.lr=0.05", "seed=0"]


def test_nested_and_dotted_parameters_are_the_same_sweep(tmp_path):
    dotted = sp.plan(sp.read_sweep(sweep_file(tmp_path, name="a")), str(tmp_path))
    nested = {"optim": {"parameters": {"lr": {"values": [0.01, 0.05]}}}, "seed": {"values": [0, 1]}}
    other = sp.plan(sp.read_sweep(sweep_file(tmp_path, nested, name="b")), str(tmp_path))
    assert [r.params for r in dotted] == [r.params for r in other]


def test_random_search_is_the_same_list_every_time(tmp_path):
    parameters = {"optim.lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 0.1},
                  "optim.momentum": {"distribution": "uniform", "min": 0.8, "max": 0.95},
                  "data.batch_size": {"values": [16, 32]}, "train.epochs": {"distribution": "int_uniform",
                                                                           "min": 1, "max": 3}}
    path = sweep_file(tmp_path, parameters, method="random", run_cap=6)
    first = [r.params for r in sp.plan(sp.read_sweep(path), str(tmp_path))]
    assert first == [r.params for r in sp.plan(sp.read_sweep(path), str(tmp_path))]
    assert first != [r.params for r in sp.plan(sp.read_sweep(path), str(tmp_path), seed=1)]
    assert len({p["optim.lr"] for p in first}) == 6
    for p in first:
        assert 1e-3 <= p["optim.lr"] <= 0.1 and 0.8 <= p["optim.momentum"] <= 0.95
        assert p["data.batch_size"] in (16, 32) and p["train.epochs"] in (1, 2, 3)
    longer = sweep_file(tmp_path, parameters, method="random", run_cap=8)
    assert [r.params for r in sp.plan(sp.read_sweep(longer), str(tmp_path))][:6] == first  # a cap raised keeps them


@pytest.mark.parametrize("value", [0.05, 1e-05, 3, True, False, None, "sgd", "yes", [1, 2], {"lr": 0.1, "x": "a b"}])
def test_an_argument_reads_back_as_the_same_value(value):
    ((key, parsed),) = parse_overrides([sp.arg("k", value)])
    assert key == "k" and parsed == value and type(parsed) is type(value)


def test_each_run_gets_its_share_of_cores_and_its_own_gpu():
    e = sw.child_env(1, 2, {"CUDA_VISIBLE_DEVICES": "4,5,6"}, cores=16)
    assert e["OMP_NUM_THREADS"] == "8" and e["CUDA_VISIBLE_DEVICES"] == "5"
    assert sw.child_env(3, 4, {"CUDA_VISIBLE_DEVICES": "0,1"}, cores=2)["CUDA_VISIBLE_DEVICES"] == "1"
    assert sw.child_env(0, 2, {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": ""}, cores=8) == \
        {"OMP_NUM_THREADS": "3", "CUDA_VISIBLE_DEVICES": ""}
    assert sw.child_env(0, 1, {}, cores=8) == {}   # one at a time: the run has the machine


def test_the_example_sweeps_plan():
    for path in glob.glob(os.path.join(ROOT, "configs", "sweeps", "*.yaml")):
        runs = sp.plan(sp.read_sweep(path), "runs")
        assert runs and all(r.folder.startswith(f"runs/{os.path.basename(path)[:-5]}/") for r in runs), path


# ----------------------------------------------------------------------------- bad input

BAD = {  # what is wrong -> (sweep file fields, CLI args, words the error must contain)
    "unknown top key": (dict(recipe="configs/debug.yaml"), [], "W&B refuses the key 'recipe'"),
    "no method": (dict(method=None), [], "method must be grid, random or bayes"),
    "bad run_cap": (dict(run_cap=0), [], "run_cap must be a positive integer"),
    "bayes": (dict(method="bayes"), [], "wandb agent"),
    "random without cap": (dict(method="random"), [], "needs run_cap"),
    "not train.py": (dict(program="other.py"), [], "program must be train.py"),
    "no args macro": (dict(command=["${env}", "${interpreter}", "${program}", *TINY]), [], "${args_no_hyphens}"),
    "json macro": (dict(command=["${env}", "${interpreter}", "${program}", "${args_json}"]), [], "${args_json}"),
    "unknown config key": (dict(parameters={"optim.learning_rate": {"values": [0.1]}}), [],
                           "unknown config key 'optim.learning_rate'"),
    "wrong type": (dict(parameters={"data.batch_size": {"values": [32, "big"]}}), [],
                   "'data.batch_size' must be an integer"),
    "out of range": (dict(parameters={"optim.lr": {"values": [0.1, -1]}}), [], "'optim.lr' must be > 0"),
    "empty grid": (dict(parameters={"optim.lr": {"values": []}}), [], "empty grid"),
    "no parameters": (dict(parameters={}), [], "parameters must map config keys"),
    "spec W&B rejects": (dict(parameters={"optim.lr": {"choices": [0.1]}}), [], "'choices'"),
    "grid of a distribution": (dict(parameters={"optim.lr": {"distribution": "uniform", "min": 0.1, "max": 1}}), [],
                               "a grid needs values"),
    "min above max": (dict(method="random", run_cap=2,
                           parameters={"optim.lr": {"distribution": "uniform", "min": 1, "max": 0.1}}), [],
                      "min < max"),
    "q zero": (dict(method="random", run_cap=2,
                    parameters={"optim.lr": {"distribution": "q_uniform", "min": 0.1, "max": 1, "q": 0}}), [],
               "q, the step its draws are rounded to, must be > 0; got 0"),
    "q negative": (dict(method="random", run_cap=2,
                        parameters={"optim.lr": {"distribution": "q_uniform", "min": 0.1, "max": 1, "q": -0.1}}), [],
                   "must be > 0; got -0.1"),
    "sigma negative": (dict(method="random", run_cap=2,
                            parameters={"optim.lr": {"distribution": "normal", "mu": 0.1, "sigma": -1}}), [],
                       "sigma must be >= 0"),
    "mu not a number": (dict(method="random", run_cap=2,
                             parameters={"optim.lr": {"distribution": "normal", "mu": "big", "sigma": 1}}), [],
                        "mu must be a finite number; got 'big'"),
    "log min above max": (dict(method="random", run_cap=2, parameters={
        "optim.lr": {"distribution": "log_uniform_values", "min": 0.1, "max": 0.01}}), [], "min < max"),
    "log_uniform overflows": (dict(method="random", run_cap=2, parameters={
        "optim.lr": {"distribution": "log_uniform", "min": 0, "max": 1000}}), [], "overflows a float"),
    "min without max": (dict(parameters={"optim.lr": {"values": [0.1], "min": 0}}), [], "min < max"),
    "distribution a list": (dict(method="random", run_cap=2,
                                 parameters={"optim.lr": {"distribution": ["uniform"], "min": 0, "max": 1}}), [],
                            "is not one of constant"),
    "probabilities not numbers": (dict(parameters={"optim.lr": {"values": [0.1, 0.2], "probabilities": ["a", "b"]}}),
                                  [], "probabilities must be numbers >= 0"),
    "index outside": ({}, ["--index", "4"], "outside this sweep's runs 0..3"),
    "negative index": ({}, ["--index", "-1", "--print-args"], "outside this sweep's runs 0..3"),
    "parallel above runs": ({}, ["--parallel", "5"], "this sweep has 4 run(s)"),
    "parallel zero": ({}, ["--parallel", "0"], "give 1..4"),
    "parallel above cores": ({}, ["--parallel", "4"], "CPU core"),
    "print-args alone": ({}, ["--print-args"], "--print-args needs --index"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_exit_2_and_starts_nothing(case, tmp_path, capsys, monkeypatch):
    fields, args, words = BAD[case]
    if case == "parallel above cores":
        monkeypatch.setattr(os, "cpu_count", lambda: 2)
    path = sweep_file(tmp_path, **fields)
    runs = tmp_path / "runs"
    with pytest.raises(SystemExit) as exit_:
        sw.main([path, "--runs-dir", str(runs), *args])
    out, err = capsys.readouterr()
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert out == "" and not runs.exists()


@pytest.mark.parametrize("text, words", [("method: [grid\n", "not valid YAML at line"), ("- a\n", "must be a mapping")])
def test_unreadable_sweep_file(tmp_path, capsys, text, words):
    (tmp_path / "s.yaml").write_text(text)
    with pytest.raises(SystemExit):
        sw.main([str(tmp_path / "s.yaml")])
    assert words in capsys.readouterr().err


def test_missing_file_through_the_real_cli(tmp_path):
    proc = sweep_cli(tmp_path / "nope.yaml")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_slurm_prints_the_array(tmp_path, capsys):
    path = sweep_file(tmp_path)
    sw.main([path, "--slurm"])
    assert capsys.readouterr().out.strip() == f"mkdir -p runs && sbatch --array=0-3 slurm/sweep.sbatch {path}"
    sw.main([path, "--slurm", "--parallel", "2", "--seed", "3", "--runs-dir", "out"])
    assert capsys.readouterr().out.strip() == (f"mkdir -p runs && sbatch --array=0-3%2 slurm/sweep.sbatch {path} "
                                               f"--runs-dir=out --seed=3")


# ----------------------------------------------------------------------------- real sweeps

def folders(runs_dir) -> list[str]:
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(runs_dir, "tiny", "[0-9]*")))


def hashes(runs_dir) -> dict:
    out = {}
    for d, _, names in os.walk(runs_dir):
        for n in names:
            p = os.path.join(d, n)
            out[p] = (os.stat(p).st_mtime_ns, open(p, "rb").read())
    return out


@pytest.fixture
def finished(shared_sweep):
    """A 2 x 2 grid on the debug recipe, run to the end one run after another, once per session (test_compare's
    seed groups are its runs too); read-only."""
    return shared_sweep(as_yaml(sweep_doc()), "tiny.yaml")


@pytest.mark.slow
def test_a_grid_runs_and_a_rerun_starts_nothing(finished):
    path, runs_dir, proc = finished
    assert folders(runs_dir) == ["00-optim.lr=0.01,seed=0", "01-optim.lr=0.01,seed=1", "02-optim.lr=0.05,seed=0",
                                 "03-optim.lr=0.05,seed=1"]
    for name in folders(runs_dir):
        run = runs_dir / "tiny" / name
        assert json.load(open(run / "status.json"))["state"] == "finished"
        saved = yaml.safe_load(open(run / "config.yaml"))
        assert f"optim.lr={saved['optim']['lr']}" in name and f"seed={saved['seed']}" in name
        assert saved["wandb"]["group"] == "tiny" and saved["data"]["limit_train"] == 256
    assert proc.stdout.count(": finished") >= 4
    before = hashes(runs_dir)
    again = sweep_cli(path, "--runs-dir", runs_dir)
    assert again.returncode == 0 and again.stdout.count("finished before, skipped") == 4
    assert "starting" not in again.stdout
    assert hashes(runs_dir) == before   # not a byte, not a timestamp changed
    dry = sweep_cli(path, "--runs-dir", runs_dir, "--dry-run")
    assert dry.returncode == 0 and dry.stdout.count("finished") == 4


def newest_step(run) -> int:
    steps = [int(p.rsplit("-", 1)[1]) for p in glob.glob(os.path.join(run, "checkpoints", "step-*"))
             if not p.endswith(".tmp")]
    return max(steps, default=-1)


def start_sweep(path, runs_dir, **popen) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cifar.sweep", path, "--runs-dir", str(runs_dir)], env=env(),
                            cwd=ROOT, **popen)


def wait_for_checkpoint(run, step: int, proc) -> None:
    """Until `run` has saved step `step` (or the sweep ended, or 5 minutes passed)."""
    deadline = time.time() + 300
    while newest_step(run) < step and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_a_sweep_killed_mid_run_resumes_to_the_same_weights(finished, tmp_path):
    path, reference, _ = finished
    runs_dir = tmp_path / "runs"
    proc = start_sweep(path, runs_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    second = runs_dir / "tiny" / "01-optim.lr=0.01,seed=1"
    wait_for_checkpoint(second, 4, proc)
    os.killpg(proc.pid, signal.SIGSTOP)   # freeze the sweep and its train.py mid-run, then kill all like a crash
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.load(open(second / "status.json"))["state"] == "running"   # killed mid-run, not finished
    assert not (second / "model.safetensors").exists() and folders(runs_dir) == folders(reference)[:2]

    again = sweep_cli(path, "--runs-dir", runs_dir, "--parallel", "2")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "run 0 00-optim.lr=0.01,seed=0: finished before, skipped" in again.stdout
    log = open(runs_dir / "tiny" / "logs" / "01-optim.lr=0.01,seed=1.log").read()
    assert "resuming from" in log                       # resumed from its checkpoint, not started over
    for name in folders(reference):
        ours, theirs = weights(runs_dir / "tiny" / name), weights(reference / "tiny" / name)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours), name


@pytest.mark.slow
def test_sigterm_stops_the_sweep_with_a_checkpoint_and_starts_nothing_more(tmp_path):
    path = sweep_file(tmp_path)
    runs_dir = tmp_path / "runs"
    proc = start_sweep(path, runs_dir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = runs_dir / "tiny" / "00-optim.lr=0.01,seed=0"
    wait_for_checkpoint(first, 2, proc)
    proc.send_signal(signal.SIGTERM)   # to the sweep alone, as a scheduler or `kill` would
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 75, out[-2000:] + err[-2000:]
    assert json.load(open(first / "status.json"))["state"] == "stopped" and newest_step(first) >= 2
    assert folders(runs_dir) == ["00-optim.lr=0.01,seed=0"]          # nothing started after the signal
    assert "SIGTERM received" in err and out.count("not started") == 3


@pytest.mark.slow
def test_a_failing_run_does_not_stop_the_others(tmp_path):
    command = ["${env}", "${interpreter}", "${program}", *TINY, "data.root=" + str(tmp_path / "nowhere"),
               "data.download=false", "${args_no_hyphens}"]
    path = sweep_file(tmp_path, {"data.source": {"values": ["cifar10", "synthetic"]}}, command)
    proc = sweep_cli(path, "--runs-dir", tmp_path / "runs")
    assert proc.returncode == 1, proc.stdout[-2000:]
    first, second = folders(tmp_path / "runs")
    assert first.startswith("00-data.source=cifar10") and second.startswith("01-data.source=synthetic")
    assert json.load(open(tmp_path / "runs" / "tiny" / second / "status.json"))["state"] == "finished"
    summary = proc.stdout[proc.stdout.rindex("outcome"):]
    assert "failed (exit 2)" in summary and "finished" in summary
    assert "not found" in summary or "nowhere" in summary   # the failed run's own error line


# ----------------------------------------------------------------------------- under `wandb agent`

AGENT = r"""
import json, os, sys
from wandb.wandb_agent import Agent

args = json.loads(sys.argv[1])
agent = Agent(api=None, queue=None, sweep_id=os.environ["WANDB_SWEEP_ID"])
agent._sweep_command = args["command"]           # what the agent reads from the sweep's config
agent._command_run({"run_id": args["run_id"], "program": "train.py", "args": args["args"]})  # W&B's own code
proc = agent._run_processes[args["run_id"]]
print("EXIT", proc.wait())
"""


def agent_run(tmp_path, parameters: dict, macro: str) -> tuple[dict, dict, str]:
    """Start train.py exactly as `wandb agent` does for one run of a sweep (W&B's Agent._command_run builds the command
    line and the parameter file), offline; return our config.yaml, the W&B run read back, and the output."""
    out = tmp_path / "run"
    command = ["${env}", "${interpreter}", "${program}", "--config", "configs/debug.yaml", "data.limit_train=128",
               "data.limit_test=64", "train.epochs=1", f"output_dir={out}", macro]
    e = env(WANDB_SWEEP_ID="swp123", WANDB_DIR=str(tmp_path), WANDB_MODE="offline",
            PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"])  # ${interpreter} is `python`
    proc = subprocess.run([sys.executable, "-c", AGENT, json.dumps({"command": command, "run_id": "agentrun1",
                                                                    "args": parameters})],
                          capture_output=True, text=True, timeout=300, env=e, cwd=ROOT, stdin=subprocess.DEVNULL)
    assert "EXIT 0" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run_dir,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*-agentrun1"))
    read = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--summary", "--json", run_dir],
                          capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    records = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", run_dir],
                             capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    (run,) = [json.loads(line)["run"] for line in records.stdout.splitlines() if '"type": "run"' in line
              or json.loads(line).get("type") == "run"]
    return yaml.safe_load(open(out / "config.yaml")), {**json.loads(read.stdout), "record": run}, proc.stdout + proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("form, macro", [("dotted", "${args_no_hyphens}"), ("nested", "${args}")])
def test_wandb_agent_command_line_parses_and_lands_nested(tmp_path, form, macro):
    parameters = ({"optim.lr": {"value": 0.05}, "seed": {"value": 3}, "data.augment": {"value": False},
                   "train.grad_clip": {"value": None}} if form == "dotted" else
                  {"optim": {"value": {"lr": 0.05, "momentum": 0.8}}, "seed": {"value": 3}})
    ours, wb, output = agent_run(tmp_path, parameters, macro)
    assert ours["optim"]["lr"] == 0.05 and ours["seed"] == 3 and ours["optim"]["name"] == "sgd"
    assert ours["data"]["limit_train"] == 128 and ours["schedule"]["name"] == "cosine"   # the recipe's, kept
    if form == "dotted":
        assert ours["data"]["augment"] is False and ours["train"]["grad_clip"] is None
        assert ours["optim"]["momentum"] == 0.9
    else:
        assert ours["optim"]["momentum"] == 0.8
    config = wb["config"]
    assert config["optim"]["lr"] == 0.05 and config["seed"] == 3 and config["optim"]["name"] == "sgd"
    assert not [k for k in config if "." in k], sorted(config)      # no flat duplicates of nested keys
    assert config["optim"]["momentum"] == ours["optim"]["momentum"] and config["data"] == ours["data"]
    assert wb["record"]["run_group"] == "sweep-swp123" and "optim.lr=0.05" in wb["record"]["tags"]
    assert "warning: W&B" not in output


def test_a_nested_parameter_keeps_the_recipes_other_keys():
    cfg = load_config(os.path.join(ROOT, "configs", "fast94.yaml"), ["--optim={'lr': 0.1}", "train.grad_clip=None"])
    assert cfg.optim.lr == 0.1 and cfg.optim.name == "muon" and cfg.optim.bias_lr == 106
    assert cfg.train.grad_clip is None


def test_runs_started_by_the_agent_report_without_wandb_mode():
    from cifar.tracking import resolve_mode

    assert resolve_mode(None, {"WANDB_SWEEP_ID": "abc"}) == ("online", None)
    assert resolve_mode(None, {"WANDB_SWEEP_ID": "abc", "WANDB_MODE": "offline"}) == ("offline", None)
    assert resolve_mode(None, {}) == ("disabled", None)


@pytest.mark.slow
def test_two_sweeps_of_one_file_share_the_runs(tmp_path):
    """Two `cifar.sweep` of one file at once. Sweep A holds run 0 (paused in its step-2 save by CIFAR_FAULT until
    SIGUSR2); sweep B, started meanwhile, shows run 0 as "running elsewhere" (not failed) and runs 1 and 2. Released,
    A finishes run 0 and skips 1 and 2 as "ran elsewhere". Every run is started once, and both sweeps exit 0."""
    path = sweep_file(tmp_path, {"seed": {"values": [0, 1, 2]}})
    runs_dir, outputs = tmp_path / "runs", {}
    first = runs_dir / "tiny" / "00-seed=0"

    def start(name, **extra):
        outputs[name] = open(tmp_path / f"{name}.out", "w+")
        return subprocess.Popen([sys.executable, "-m", "cifar.sweep", path, "--runs-dir", str(runs_dir)], cwd=ROOT,
                                env=env(**extra), stdout=outputs[name], stderr=subprocess.STDOUT)

    def output(name) -> str:
        outputs[name].seek(0)
        return outputs[name].read()

    a, b = start("a", CIFAR_FAULT="pause-after-save:2"), None
    try:
        deadline = time.monotonic() + 120
        while "pause-after-save at step 2" not in output("a"):     # A's train.py holds run 0, paused
            assert a.poll() is None and time.monotonic() < deadline, output("a")[-3000:]
            time.sleep(0.05)
        b = start("b")
        assert b.wait(timeout=300) == 0, output("b")[-3000:]
        os.kill(run_folder.holder(str(first))["pid"], signal.SIGUSR2)   # A's run 0 goes on
        assert a.wait(timeout=300) == 0, output("a")[-3000:]
    finally:
        for proc in [p for p in (a, b) if p is not None and p.poll() is None]:
            proc.kill()
            proc.wait()
    out_a, out_b = output("a"), output("b")
    summary_a, summary_b = out_a[out_a.rindex("outcome"):], out_b[out_b.rindex("outcome"):]
    assert "run 0 00-seed=0: running elsewhere: held by train.py pid" in out_b, out_b[-3000:]
    assert "running elsewhere" in summary_b and "failed" not in summary_b and summary_b.count("finished") == 2
    assert "run 1 01-seed=1: ran elsewhere" in out_a and "run 2 02-seed=2: ran elsewhere" in out_a, out_a[-3000:]
    assert summary_a.count("ran elsewhere") == 2 and "failed" not in summary_a
    for i, name in enumerate(folders(runs_dir)):
        assert (out_a + out_b).count(f"sweep: run {i} {name}: starting") == 1, name
        assert run_folder.state(str(runs_dir / "tiny" / name)) == "finished"
        assert not glob.glob(str(runs_dir / "tiny" / name / "previous-*"))      # never started over


@pytest.mark.slow
def test_a_run_the_other_sweep_started_first_is_running_elsewhere_not_failed(tmp_path, monkeypatch):
    """The race two sweeps can still run into: both checked the run before either started it. The lock refuses the
    later train.py (exit 2), and its sweep reports the run as running elsewhere, not failed. Staged in-process: the
    start-time check is made to miss (monkeypatch), a forked child holds the folder; train.py itself is real."""
    path = sweep_file(tmp_path, {"seed": {"values": [0]}})
    (run,) = sp.plan(sp.read_sweep(path), str(tmp_path / "runs"), 0)
    os.makedirs(run.folder)
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sw.Runner, "_skip_if_elsewhere", lambda self, run: False)
    with lock_held_by_child(run.folder):
        results = sw.Runner([run], 1, None).run()
    outcome, detail = results[run.index]
    assert (outcome, detail) == ("running elsewhere", "held by another process (it has just started)"), results
