"""cifar.tracking: real offline W&B runs, read back with `wandb leet inspect`, and every way W&B can fail.

Each scenario runs in its own process (wandb reads its environment once per process), with W&B's home, cache
and data folders inside tmp_path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from cifar.config import Config, WandbConfig, load_config
from cifar import tracking
from cifar.tracking import Tracker, flatten, git_commit, resolve_mode
from conftest import ROOT, env, free_port, logged_warnings

DEBUG_LR = load_config(os.path.join(ROOT, "configs", "debug.yaml")).optim.lr   # what the debug runs' W&B config says

SENTINEL_KEY = "sentinel" * 5  # 40 characters, the length of a real key

DRIVER = r"""
import json, os, sys
a = json.loads(sys.argv[1])
if a.get("block_wandb"):
    sys.modules["wandb"] = None  # `import wandb` now raises ImportError, as when it is not installed
import numpy as np
from cifar.config import load_config
from cifar.tracking import Tracker

cfg = load_config(os.path.join(a["root"], "configs", "debug.yaml"), a["overrides"])
tracker = Tracker.start(cfg, output_dir=a["output_dir"], enabled=a.get("enabled", True), run_id=a.get("run_id"),
                        extra={"world_size": 2, "global_batch_size": 64})
info = {"active": tracker.active, "run_dir": tracker.run_dir}
rng = np.random.default_rng(0)
for step in a["steps"]:
    tracker.log({"step": step, "epoch": step // 20, "lr": 0.05, "train/loss": 10.0 / step, "train/acc": 50.0,
                 "images_per_sec": 1000.0})
    if step % 20 == 0:
        tracker.log({"step": step, "epoch": step // 20, "epoch_time": 1.5, "test/acc": float(step),
                     "test/loss": 1.0, "test/per_class": {"cat": 30.0, "dog": 60.0}, "test/count": 100})
        tracker.log_eval(step, rng.integers(0, 9, (10, 10)).tolist(), rng.random((8, 3, 32, 32)),
                         list(range(8)), [0, 1, 2, 3, 3, 3, 3, 3])
tracker.summary({"final_test_acc": float(a["steps"][-1]), "best_test_acc": 99.5, "wall_seconds": 3.0,
                 "time_to_target": None})
tracker.finish()
tracker.log({"step": 1000, "train/loss": 1.0})  # after finish: ignored
info.update(run_id=tracker.run_id, active_after=tracker.active, wandb_imported="wandb" in sys.modules)
print("RESULT " + json.dumps(info))
"""


def drive(tmp_path, output_dir, steps=(10, 20, 30, 40), overrides=("wandb.mode=offline",), timeout=120,
          block_wandb=False, enabled=True, run_id=None, **environ):
    """Run DRIVER in a fresh process; returns (result dict, stderr)."""
    home = tmp_path / "home"
    e = env(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
            WANDB_DATA_DIR=str(home / "data"), WANDB_API_KEY=SENTINEL_KEY)
    for k in ("WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "WANDB_INIT_TIMEOUT"):
        e.pop(k, None)
    e.update({k: v for k, v in environ.items() if v is not None})
    for k in [k for k, v in environ.items() if v is None]:
        e.pop(k, None)
    args = dict(root=ROOT, output_dir=str(output_dir), steps=list(steps), overrides=list(overrides),
                block_wandb=block_wandb, enabled=enabled, run_id=run_id)
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(args)], capture_output=True, text=True,
                          timeout=timeout, env=e, cwd=str(tmp_path), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    return json.loads(lines[0][len("RESULT "):]), proc.stderr


def warnings_in(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("warning: W&B")]


def leet(run_dir, summary=False):
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", *(["--summary"] if summary else []), "--json", run_dir]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    if summary:
        return json.loads(proc.stdout)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.strip()]


def history(run_dir) -> list[dict]:
    return [r["history"]["item"] for r in leet(run_dir) if r["type"] == "history"]


def files_under(folder):
    return [os.path.join(d, f) for d, _, names in os.walk(folder) for f in names]


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wandb")
    output_dir = tmp / "debug-run"
    result, stderr = drive(tmp, output_dir)
    return dict(result, tmp=tmp, output_dir=output_dir, stderr=stderr)


# ----------------------------------------------------------------------------- a real offline run

def test_offline_run_is_written_under_the_run_folder(offline_run):
    assert offline_run["active"] and not offline_run["active_after"]
    assert warnings_in(offline_run["stderr"]) == []
    run_dir = offline_run["run_dir"]
    assert os.path.dirname(run_dir) == str(offline_run["output_dir"] / "wandb")
    assert os.path.basename(run_dir).startswith("offline-run-") and run_dir.endswith(offline_run["run_id"])


def test_config_is_nested_with_run_info(offline_run):
    s = leet(offline_run["run_dir"], summary=True)
    assert s["run_id"] == offline_run["run_id"] and s["state"] == "finished" and s["exit_code"] == 0
    assert s["name"] == "debug-run" and s["project"] == "cifar10"  # default name: the run folder
    config = s["config"]
    assert config["optim"]["lr"] == DEBUG_LR and config["data"]["source"] == "synthetic" and config["name"] == "debug"
    info = config["run"]
    assert info["world_size"] == 2 and info["global_batch_size"] == 64
    assert {"torch", "accelerate", "wandb", "python", "git_commit"} <= info.keys()
    assert info["git_commit"] is None or len(info["git_commit"]) == 40
    assert info["git_commit"] == head_of(ROOT) and len(info["git_commit"]) == 40   # the suite runs in a checkout
    (run,) = [r["run"] for r in leet(offline_run["run_dir"]) if r["type"] == "run"]
    assert run["run_group"] == "debug" and run["job_type"] == "train"  # default group: the recipe name


def test_history_against_global_step(offline_run):
    rows = history(offline_run["run_dir"])
    train = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in train] == [10, 20, 30, 40]
    assert all(r["lr"] == 0.05 for r in train) and train[0]["train/loss"] == 1.0
    test = [r for r in rows if "test/acc" in r]
    assert [(r["global_step"], r["test/acc"]) for r in test] == [(20, 20.0), (40, 40.0)]
    assert test[0]["test/per_class/cat"] == 30.0 and test[0]["test/per_class/dog"] == 60.0
    assert "step" not in rows[0]
    evals = [r for r in rows if any(k.startswith("test/samples") for k in r)]
    assert [r["global_step"] for r in evals] == [20, 40]
    assert all(any(k.startswith("test/confusion") for k in r) for r in evals)
    metrics = [r["metric"] for r in leet(offline_run["run_dir"]) if r["type"] == "metric"]
    assert any(m.get("glob_name") == "*" and m.get("step_metric") == "global_step" for m in metrics)


def test_summary_holds_the_final_figures(offline_run):
    summary = leet(offline_run["run_dir"], summary=True)["summary"]
    assert summary["final_test_acc"] == 40.0 and summary["best_test_acc"] == 99.5 and summary["wall_seconds"] == 3
    assert "time_to_target" not in summary  # None values are skipped
    assert summary["global_step"] == 40


def test_api_key_is_written_nowhere(offline_run):
    files = files_under(offline_run["output_dir"])
    assert len(files) > 3
    for path in files:
        with open(path, "rb") as f:
            assert SENTINEL_KEY.encode() not in f.read(), path
    assert SENTINEL_KEY not in offline_run["stderr"]


@pytest.mark.slow
def test_resume_continues_the_same_run_past_the_old_step(offline_run, tmp_path):
    result, stderr = drive(offline_run["tmp"], offline_run["output_dir"], steps=(50, 60, 70, 80),
                           run_id=offline_run["run_id"])
    assert warnings_in(stderr) == []
    assert result["run_id"] == offline_run["run_id"]
    assert result["run_dir"] != offline_run["run_dir"] and result["run_dir"].endswith(offline_run["run_id"])
    steps = [r["global_step"] for r in history(result["run_dir"]) if "train/loss" in r]
    assert steps == [50, 60, 70, 80]  # wandb's own _step restarts at 0 offline; the global step does not
    assert leet(result["run_dir"], summary=True)["config"]["optim"]["lr"] == DEBUG_LR


# ----------------------------------------------------------------------------- off: zero cost

@pytest.mark.parametrize("overrides, environ", [
    (["wandb.mode=disabled"], {"WANDB_MODE": "offline"}),  # the config wins over the environment
    ([], {}),                                              # mode null, no WANDB_MODE: off
])
def test_disabled_imports_nothing_and_writes_nothing(tmp_path, overrides, environ):
    output_dir = tmp_path / "run"
    result, stderr = drive(tmp_path, output_dir, overrides=overrides, **environ)
    assert result == {"active": False, "run_dir": None, "run_id": None, "active_after": False,
                      "wandb_imported": False}
    assert not output_dir.exists() and warnings_in(stderr) == []


def test_mode_null_follows_wandb_mode(tmp_path):
    result, stderr = drive(tmp_path, tmp_path / "run", steps=(10,), overrides=[], WANDB_MODE="offline")
    assert result["active"] and result["run_id"] and warnings_in(stderr) == []


def test_non_main_process_never_imports_wandb(tmp_path):
    result, stderr = drive(tmp_path, tmp_path / "run", enabled=False, run_id="abc123")
    assert result["wandb_imported"] is False and result["active"] is False
    assert result["run_id"] == "abc123"  # kept for the checkpoint even where nothing is logged
    assert not (tmp_path / "run").exists() and warnings_in(stderr) == []


# ----------------------------------------------------------------------------- broken W&B: one warning, no-op

def assert_one_warning_and_no_op(result, stderr, why: str):
    found = warnings_in(stderr)
    assert len(found) == 1, stderr[-3000:]
    assert why in found[0], found[0]
    assert result["active"] is False and result["active_after"] is False
    assert SENTINEL_KEY not in stderr


def test_wandb_not_installed(tmp_path):
    result, stderr = drive(tmp_path, tmp_path / "run", block_wandb=True)
    assert_one_warning_and_no_op(result, stderr, "wandb cannot be imported")
    assert result["wandb_imported"] is True  # (the None placeholder the test put in sys.modules)


def test_wandb_dir_is_a_file(tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    result, stderr = drive(tmp_path, tmp_path / "run", WANDB_DIR=str(blocker))
    assert_one_warning_and_no_op(result, stderr, "init failed")
    assert not (tmp_path / "run").exists()


def test_online_without_api_key_does_not_prompt(tmp_path):
    start = time.monotonic()
    result, stderr = drive(tmp_path, tmp_path / "run", overrides=["wandb.mode=online"], WANDB_API_KEY=None)
    assert_one_warning_and_no_op(result, stderr, "no API key")
    assert time.monotonic() - start < 30


@pytest.mark.slow
def test_online_unreachable_server_gives_up(tmp_path):
    start = time.monotonic()
    result, stderr = drive(tmp_path, tmp_path / "run", overrides=["wandb.mode=online"],
                           WANDB_BASE_URL=f"http://127.0.0.1:{free_port()}", WANDB_INIT_TIMEOUT="1")
    assert_one_warning_and_no_op(result, stderr, "init failed")
    assert time.monotonic() - start < 60
    for path in files_under(tmp_path / "run"):
        with open(path, "rb") as f:
            assert SENTINEL_KEY.encode() not in f.read(), path


class FlakyRun:
    """Stands in for a wandb run whose calls raise."""
    id = "flaky01"
    dir = "/nowhere/files"

    def __init__(self):
        self.calls = 0
        self.summary = self

    def log(self, *args, **kwargs):
        self.calls += 1
        raise ConnectionError(f"socket closed; key {os.environ.get('WANDB_API_KEY')}")

    update = finish = log


@pytest.mark.parametrize("first", ["log", "summary", "finish", "log_eval"])
def test_an_exception_while_logging_disables_the_tracker(first, capsys, caplog, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", SENTINEL_KEY)
    tracker, run = Tracker(), FlakyRun()
    tracker._run = run
    calls = {"log": lambda: tracker.log({"step": 1, "train/loss": 1.0}),
             "summary": lambda: tracker.summary({"final_test_acc": 1.0}),
             "finish": lambda: tracker.finish(1),
             "log_eval": lambda: tracker.log_eval(1, [[1]], None, [0], [0])}
    calls[first]()
    for call in calls.values():
        call()
    err = capsys.readouterr().err + logged_warnings(caplog)
    assert len(warnings_in(err)) == 1 and first in warnings_in(err)[0], err
    assert SENTINEL_KEY not in err
    assert "***" in err or first == "log_eval"  # the key is redacted from the message
    assert run.calls <= 1 and not tracker.active and tracker.run_id == "flaky01"


# ----------------------------------------------------------------------------- pure helpers

def test_resolve_mode():
    assert resolve_mode("offline", {"WANDB_MODE": "disabled"}) == ("offline", None)
    assert resolve_mode(None, {"WANDB_MODE": "online"}) == ("online", None)
    assert resolve_mode(None, {"WANDB_MODE": "dryrun"}) == ("offline", None)
    assert resolve_mode(None, {}) == ("disabled", None)
    mode, problem = resolve_mode(None, {"WANDB_MODE": "sometimes"})
    assert mode == "disabled" and "sometimes" in problem


def test_flatten():
    row = {"step": 3, "test/per_class": {"cat": 1.0, "dog": {"x": 2}}, "grad_norm": None}
    assert flatten(row) == {"step": 3, "test/per_class/cat": 1.0, "test/per_class/dog/x": 2}


def head_of(folder) -> str | None:
    proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=30)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_git_commit_is_none_outside_a_checkout_or_without_git(tmp_path, monkeypatch):
    assert git_commit() == head_of(ROOT) and len(git_commit()) == 40
    monkeypatch.setattr(tracking, "CHECKOUT", str(tmp_path))  # code unpacked from an archive: no .git above it
    assert head_of(tmp_path) is None and git_commit() is None
    inside = os.path.join(ROOT, "cifar")                       # a wheel installed in a venv inside a checkout
    monkeypatch.setattr(tracking, "CHECKOUT", inside)
    assert head_of(inside) == head_of(ROOT) and git_commit() is None
    monkeypatch.setattr(tracking, "CHECKOUT", ROOT)
    monkeypatch.setenv("PATH", str(tmp_path))                  # a checkout, but no git program
    assert git_commit() is None


def test_disabled_tracker_is_inert_in_process():
    cfg = Config(wandb=WandbConfig(mode="disabled"))
    imported = "wandb" in sys.modules
    tracker = Tracker.start(cfg, output_dir="/nonexistent/run", enabled=True, run_id="keep")
    try:
        tracker.log({"step": 1})
        tracker.log_eval(1, [[1]], None, [0], [0])
        tracker.summary({"a": 1})
    finally:
        tracker.finish(0)
    assert not tracker.active and tracker.run_id == "keep" and tracker.run_dir is None
    assert ("wandb" in sys.modules) == imported
