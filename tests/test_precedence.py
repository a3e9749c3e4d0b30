"""Who decides a setting (cifar/precedence.py): train.py's command line > the launcher's ACCELERATE_* variables and
W&B's WANDB_* variables > the recipe, resolved into the Config before the run, one line per value set that lost.

The rule itself is checked in this process with crafted environments (and a real process standing for the
`accelerate launch` whose command line is read back); the slow tests launch the real thing: `accelerate launch`
with and without its flags, a one-process `accelerate launch --num_processes 2`, and `torchrun`."""
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import DOUBLE_BATCH, ROOT, env, free_port, max_diff, read_json, weights
from inprocess import call, refusal
from test_wandb_training import leet, runs_in, wandb_env

from cifar import precedence
from cifar.config import load_config
from cifar.sweep import changed
from cifar.sweep_plan import PlannedRun, Sweep

RESNET = f"{ROOT}/configs/resnet18.yaml"      # a recipe with mixed_precision: bf16
DEBUG = f"{ROOT}/configs/debug.yaml"          # one with no
LAUNCHED = {precedence.LAUNCHED: "False"}     # what every accelerate launcher exports


def resolved(recipe, overrides=(), parent=None, **environ):
    cfg = load_config(recipe, list(overrides))
    return precedence.resolve(cfg, precedence.given_keys(list(overrides)), environ, parent=parent)


@pytest.fixture
def launcher():
    """launcher(*options): a live process whose command line is `... launch OPTIONS train.py`, as the
    `accelerate launch` that started a run has; its pid."""
    started = []

    def start(*options):
        proc = subprocess.Popen([sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()",
                                 "launch", *options, "train.py", "--config", "x.yaml"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline() == "up\n"      # its command line is the one above from now on
        return proc.pid

    yield start
    for proc in started:
        proc.stdin.close()
        proc.wait()


# ----------------------------------------------------------------------------- the launcher's precision and dynamo

def test_the_launchers_precision_beats_the_recipe_with_a_line():
    cfg, notes = resolved(DEBUG, ACCELERATE_MIXED_PRECISION="bf16")
    assert cfg.train.mixed_precision == "bf16"
    assert notes == ["train.mixed_precision=bf16 from $ACCELERATE_MIXED_PRECISION=bf16 wins over the recipe's no; "
                     "set train.mixed_precision on train.py's command line to choose"]
    cfg, notes = resolved(RESNET, ACCELERATE_MIXED_PRECISION="no")       # a variable the user exported himself
    assert cfg.train.mixed_precision == "no"
    assert notes == ["train.mixed_precision=no from $ACCELERATE_MIXED_PRECISION=no wins over the recipe's bf16; set "
                     "train.mixed_precision on train.py's command line to choose"]


def test_the_command_line_beats_the_launcher_with_a_line():
    cfg, notes = resolved(DEBUG, ["train.mixed_precision=no"], ACCELERATE_MIXED_PRECISION="bf16")
    assert cfg.train.mixed_precision == "no"
    assert notes == ["train.mixed_precision=no from train.py's command line wins over "
                     "$ACCELERATE_MIXED_PRECISION=bf16"]
    cfg, notes = resolved(DEBUG, ["--train={mixed_precision: no}"], ACCELERATE_MIXED_PRECISION="bf16")
    assert cfg.train.mixed_precision == "no" and len(notes) == 1     # a section given whole sets its keys too


def test_accelerate_launchs_default_is_not_a_choice_but_its_flag_is(launcher):
    """accelerate launch exports ACCELERATE_MIXED_PRECISION=no whether or not it was given --mixed_precision: its
    command line (the parent process's) decides."""
    quiet = launcher("--num_processes", "1")
    cfg, notes = resolved(RESNET, parent=quiet, ACCELERATE_MIXED_PRECISION="no", ACCELERATE_DYNAMO_BACKEND="NO",
                          ACCELERATE_DYNAMO_MODE="default", **LAUNCHED)
    assert (cfg.train.mixed_precision, notes) == ("bf16", [])
    asked = launcher("--mixed_precision", "no", "--dynamo_backend=no")
    assert precedence.launcher_options(LAUNCHED, asked) == {"mixed_precision", "dynamo_backend"}
    cfg, notes = resolved(RESNET, parent=asked, ACCELERATE_MIXED_PRECISION="no", **LAUNCHED)
    assert cfg.train.mixed_precision == "no"
    assert notes == ["train.mixed_precision=no from the launcher's no (accelerate launch --mixed_precision, its "
                     "config file or $ACCELERATE_MIXED_PRECISION) wins over the recipe's bf16; set "
                     "train.mixed_precision on train.py's command line to choose"]
    # a launcher whose command line cannot be found (not this process's parent): its default is not a choice
    assert precedence.launcher_options(LAUNCHED, 2 ** 22 + 1) == set()
    assert precedence.launcher_options({}, asked) is None        # not started by accelerate launch at all


def test_the_launchers_dynamo_backend_and_mode_set_compile():
    cfg, notes = resolved(DEBUG, ACCELERATE_DYNAMO_BACKEND="INDUCTOR", ACCELERATE_DYNAMO_MODE="max-autotune")
    assert (cfg.train.compile, cfg.train.compile_mode) == (True, "max-autotune")
    assert notes == ["train.compile=true from $ACCELERATE_DYNAMO_BACKEND=inductor wins over the recipe's false; set "
                     "train.compile on train.py's command line to choose",
                     "train.compile_mode=max-autotune from $ACCELERATE_DYNAMO_MODE=max-autotune wins over the "
                     "recipe's default; set train.compile_mode on train.py's command line to choose"]
    cfg, notes = resolved(DEBUG, ["train.compile=false"], ACCELERATE_DYNAMO_BACKEND="INDUCTOR")
    assert not cfg.train.compile
    assert notes == ["train.compile=false from train.py's command line wins over $ACCELERATE_DYNAMO_BACKEND=inductor"]


def test_a_launcher_value_this_trainer_cannot_run_is_one_line(capsys):
    line = refusal(capsys, "train.py", "--print-config", ACCELERATE_DYNAMO_BACKEND="EAGER")
    assert line == ("error: $ACCELERATE_DYNAMO_BACKEND=eager: this trainer compiles with inductor "
                    "(train.compile=true) or not at all; launch with --dynamo_backend inductor or no, or set "
                    "train.compile on train.py's command line")
    line = refusal(capsys, "train.py", "--print-config", ACCELERATE_MIXED_PRECISION="fp8")
    assert line == ("error: $ACCELERATE_MIXED_PRECISION=fp8: mixed precision 'fp8' is not one this trainer runs "
                    "(no, fp16, bf16); launch with one of them")
    line = refusal(capsys, "train.py", "--print-config", ACCELERATE_DYNAMO_MODE="fastest")
    assert line == ("error: $ACCELERATE_DYNAMO_MODE=fastest: not a torch.compile mode this trainer runs (default, "
                    "reduce-overhead, max-autotune, max-autotune-no-cudagraphs); launch with one of them")
    # the command line's key decides instead: nothing to refuse
    call("train.py", "--print-config", "train.mixed_precision=no", ACCELERATE_MIXED_PRECISION="fp8")
    assert "mixed_precision: 'no'" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 autocast runs on a CUDA GPU")
def test_fp16_from_the_launcher_on_a_cpu_says_exactly_why_not(capsys):
    line = refusal(capsys, "train.py", "--print-config", ACCELERATE_MIXED_PRECISION="fp16")
    assert line == ("error: $ACCELERATE_MIXED_PRECISION=fp16: fp16 autocast needs a CUDA GPU and this machine has "
                    "none; launch with --mixed_precision bf16 (CPU autocast) or no")


def test_print_config_shows_the_resolved_values_and_the_line(capsys, caplog):
    call("train.py", "--config", RESNET, "--print-config", ACCELERATE_MIXED_PRECISION="no",
         WANDB_PROJECT="elsewhere")
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["train"]["mixed_precision"] == "no" and printed["wandb"]["project"] == "elsewhere"
    assert [r.getMessage() for r in caplog.records if r.name == "cifar"] == [
        "train.mixed_precision=no from $ACCELERATE_MIXED_PRECISION=no wins over the recipe's bf16; set "
        "train.mixed_precision on train.py's command line to choose",
        "wandb.project=elsewhere from $WANDB_PROJECT=elsewhere wins over the recipe's cifar10; set wandb.project on "
        "train.py's command line to choose"]


# ----------------------------------------------------------------------------- W&B's variables

def test_wandb_variables_beat_the_recipe_and_lose_to_the_command_line():
    environ = dict(WANDB_PROJECT="x", WANDB_ENTITY="team", WANDB_RUN_GROUP="g", WANDB_NAME="n", WANDB_JOB_TYPE="j",
                   WANDB_TAGS="a, b", WANDB_NOTES="why")
    cfg, notes = resolved(DEBUG, **environ)
    w = cfg.wandb
    assert (w.project, w.entity, w.group, w.name, w.job_type, w.tags, w.notes) == ("x", "team", "g", "n", "j",
                                                                                    ["a", "b"], "why")
    assert notes == [f"wandb.{key}={new} from ${variable}={new} wins over the recipe's {old}; set wandb.{key} on "
                     f"train.py's command line to choose" for key, variable, new, old in (
                         ("project", "WANDB_PROJECT", "x", "cifar10"), ("job_type", "WANDB_JOB_TYPE", "j", "train"))]
    cfg, notes = resolved(DEBUG, ["wandb.project=y", "wandb.tags=[c]"], **environ)
    assert (cfg.wandb.project, cfg.wandb.tags, cfg.wandb.entity) == ("y", ["c"], "team")
    assert {"wandb.project=y from train.py's command line wins over $WANDB_PROJECT=x",
            "wandb.tags=c from train.py's command line wins over $WANDB_TAGS=a, b"} < set(notes)


def test_wandb_mode_beats_the_recipes_mode_and_a_null_mode_keeps_following_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"base: {DEBUG}\nwandb: {{mode: online}}\n")
    cfg, notes = resolved(str(recipe), WANDB_MODE="offline")
    assert cfg.wandb.mode == "offline"
    assert notes == ["wandb.mode=offline from $WANDB_MODE=offline wins over the recipe's online; set wandb.mode on "
                     "train.py's command line to choose"]
    cfg, notes = resolved(str(recipe), ["wandb.mode=disabled"], WANDB_MODE="offline")
    assert cfg.wandb.mode == "disabled" and len(notes) == 1
    assert resolved(DEBUG, WANDB_MODE="offline")[0].wandb.mode is None     # null: the tracker reads $WANDB_MODE
    assert resolved(str(recipe), WANDB_MODE="loud")[0].wandb.mode == "online"   # the tracker warns about it


def test_a_sweep_compares_a_finished_run_with_the_config_its_train_py_resolved(tmp_path, monkeypatch):
    """cifar.sweep decides whether a finished run is the one asked for from its config.yaml, which holds the
    WANDB_* values its train.py resolved: the sweep resolves the same (its runs get its environment)."""
    monkeypatch.setenv("WANDB_PROJECT", "x")
    args = ["--config", DEBUG, "optim.lr=0.1"]
    cfg, _ = precedence.resolve(load_config(DEBUG, args[2:]), precedence.given_keys(args[2:]))
    (tmp_path / "config.yaml").write_text(cfg.to_yaml())
    run_, sweep_ = PlannedRun(0, {"optim.lr": 0.1}, str(tmp_path), args), Sweep("s.yaml", "s", "grid", DEBUG, [], {})
    assert changed(run_, sweep_) is None
    monkeypatch.setenv("WANDB_PROJECT", "y")
    assert changed(run_, sweep_) == "wandb.project: 'x' -> 'y'"


# ----------------------------------------------------------------------------- the number of processes

def test_a_one_process_launch_asked_for_several_says_so():
    line = ("accelerate launch was asked for several processes (--num_processes/--num_machines) but started this "
            "one alone: without --multi_gpu it runs the script once; add --multi_gpu (DDP, over gloo on CPU) to "
            "train on several")
    assert precedence.process_count({**LAUNCHED, "MASTER_PORT": "29500"}) == [line]
    assert precedence.process_count({**LAUNCHED, "MASTER_PORT": "29500", "WORLD_SIZE": "2"}) == []
    assert precedence.process_count({**LAUNCHED}) == []                        # asked for one
    assert precedence.process_count({"MASTER_PORT": "29500"}) == []          # no accelerate launcher


# ----------------------------------------------------------------------------- the real launchers

def accelerate(*args, **kw):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env(**kw))


@pytest.mark.slow
@pytest.mark.budget(seconds=120, reason="seven processes under accelerate launch (each imports torch twice: the "
                                        "launcher, then train.py), one of them a short bf16 run: 41 s in the suite")
def test_accelerate_launch_precision_reaches_the_run_and_its_record(tmp_path):
    """`accelerate launch --mixed_precision bf16` with a `no` recipe trains in bf16, recorded in config.yaml and
    summary.json; train.py's key beats it; the launcher's `no` beats a bf16 recipe only when it was given; and
    --num_processes 2 without --multi_gpu says that it started one process."""
    out = tmp_path / "r"
    proc = accelerate("--mixed_precision", "bf16", "train.py", "--config", "configs/debug.yaml",
                      "data.limit_train=64", "data.limit_test=32", "train.epochs=1", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["mixed_precision"] == "bf16"
    assert read_json(out / "summary.json")["mixed_precision"] == "bf16"

    def printed(*args):
        proc = accelerate(*args, "--print-config")
        assert proc.returncode == 0, proc.stderr[-3000:]
        return yaml.safe_load(proc.stdout)["train"]["mixed_precision"], [
            line for line in proc.stderr.splitlines() if line.startswith("warning: ")]

    assert printed("--mixed_precision", "bf16", "train.py", "train.mixed_precision=no") == ("no", [
        "warning: train.mixed_precision=no from train.py's command line wins over the launcher's bf16 (accelerate "
        "launch --mixed_precision, its config file or $ACCELERATE_MIXED_PRECISION)"])
    assert printed("train.py", "--config", "configs/resnet18.yaml") == ("bf16", [])
    precision, lines = printed("--mixed_precision", "no", "train.py", "--config", "configs/resnet18.yaml")
    assert precision == "no" and len(lines) == 1 and "wins over the recipe's bf16" in lines[0]
    precision, lines = printed("--num_processes", "2", "--main_process_port", str(free_port()), "train.py")
    assert lines == ["warning: " + precedence.process_count({**LAUNCHED, "MASTER_PORT": "1"})[0]]
    # two processes (the multi-GPU launcher: its workers' parent is still the accelerate launch process): its `no`
    # was given, and the line comes once, from rank 0
    proc = accelerate("--multi_gpu", "--num_processes", "2", "--main_process_port", str(free_port()),
                      "--mixed_precision", "no", "train.py", "--config", "configs/resnet18.yaml", "--print-config")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.strip() for line in proc.stdout.splitlines() if "mixed_precision" in line] == \
        ["mixed_precision: 'no'"] * 2                                  # each rank prints the config it trains
    assert [line for line in proc.stderr.splitlines() if line.startswith("warning: ")] == [
        "warning: train.mixed_precision=no from the launcher's no (accelerate launch --mixed_precision, its config "
        "file or $ACCELERATE_MIXED_PRECISION) wins over the recipe's bf16; set train.mixed_precision on train.py's "
        "command line to choose"]


@pytest.mark.slow
def test_torchrun_trains_as_accelerate_launch_does(tmp_path, baseline):
    """`torchrun --nproc_per_node 2 train.py` (docs/distributed.md): the same weights as `accelerate launch
    --multi_gpu --num_processes 2`."""
    two = baseline(*DOUBLE_BATCH, "data.batch_size=6", procs=2)
    out = tmp_path / "torchrun"
    args = [*DOUBLE_BATCH, "data.batch_size=6", f"output_dir={out}"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_port", str(free_port()), "train.py", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_json(out / "summary.json")["world_size"] == 2
    assert max_diff(weights(out), weights(two)) == 0.0



@pytest.mark.slow
def test_evaluate_resolves_like_train_over_the_runs_saved_config(tmp_path, capsys):
    """evaluate.py: $ACCELERATE_MIXED_PRECISION=bf16 evaluates a run trained in `no` with bf16 autocast, says so in
    one line and records it in eval.json; train.mixed_precision=no on evaluate.py's command line wins over it, with
    its line; the launcher's dynamo backend is not evaluate's (it compiles nothing): no line. $WANDB_PROJECT lands
    the W&B offline eval run in that project, over the saved config's, with its line. The run is trained in this
    process; evaluate.py runs as a process, as launched (an Accelerator's precision is fixed per process)."""
    run = tmp_path / "run"
    call("train.py", "--config", DEBUG, "data.limit_train=64", "data.limit_test=32", "train.epochs=1",
         f"output_dir={run}")

    def evaluated(out, *overrides, **environ):
        proc = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(run), "--output", str(out),
                               *overrides], cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env=env(ACCELERATE_MIXED_PRECISION="bf16", ACCELERATE_DYNAMO_BACKEND="inductor",
                                      **environ))
        assert proc.returncode == 0, proc.stderr[-3000:]
        warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: ")]
        return read_json(out / "eval.json")["mixed_precision"], warnings

    assert evaluated(tmp_path / "a", **wandb_env(tmp_path, WANDB_PROJECT="elsewhere")) == ("bf16", [
        "warning: train.mixed_precision=bf16 from $ACCELERATE_MIXED_PRECISION=bf16 wins over the run's saved config's "
        "no; set train.mixed_precision on evaluate.py's command line to choose",
        "warning: wandb.project=elsewhere from $WANDB_PROJECT=elsewhere wins over the run's saved config's cifar10; "
        "set wandb.project on evaluate.py's command line to choose"])
    (eval_run,) = runs_in(tmp_path / "a")
    assert [r["run"]["project"] for r in leet(eval_run) if r["type"] == "run"] == ["elsewhere"]
    assert evaluated(tmp_path / "b", "train.mixed_precision=no") == ("no", [
        "warning: train.mixed_precision=no from evaluate.py's command line wins over $ACCELERATE_MIXED_PRECISION=bf16"])
    assert yaml.safe_load((run / "config.yaml").read_text())["train"]["mixed_precision"] == "no"   # the run's own
