"""W&B from real training runs (offline mode, read back with `wandb leet inspect`).

The tests that only read a run back share one offline W&B run of the debug recipe (the `wandb_debug` baseline);
the ones about a process boundary (a stop and resume, the backend killed mid-run, a second rank) train their own.
What must happen mid-run happens while the run is held there by the pause fault point
(CIFAR_FAULT=pause-after-save:<step>), not in a race with a long run."""
import glob
import json
import os
import shlex
import shutil
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from conftest import DEBUG, ROOT, command, env, logged_warnings, read_json, read_jsonl, run, weights
from test_tracking import DEBUG_LR, SENTINEL_KEY, files_under, history, leet

from train import main as train_main

TAGS = "wandb.tags=[ci, debug]"
PAUSE_AT = 64   # the end of the debug run's first epoch: a save and an evaluation behind it, 128 steps ahead
RANKS_PROBE = """\
import atexit, json, os, sys
# Which processes imported wandb, written as each one exits: tests/test_wandb_training.py's rank probe
rank = os.environ.get("RANK")
if rank is not None:
    atexit.register(lambda: open(os.path.join(os.environ["RANKS_PROBE_DIR"], f"rank{rank}.json"), "w").write(
        json.dumps({"wandb": "wandb" in sys.modules, "pid": os.getpid()})))
"""


def wandb_env(tmp_path, **extra):
    home = tmp_path / "home"
    return dict(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                WANDB_DATA_DIR=str(home / "data"), WANDB_MODE="offline", WANDB_API_KEY=SENTINEL_KEY, **extra)


def runs_in(out):
    return sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*")))


@pytest.fixture
def wandb_debug(baseline):
    """The debug run with W&B offline (tagged ci, debug), trained once per session, W&B's home in the baseline's
    private folder; read-only."""
    return baseline(*DEBUG, TAGS, **wandb_env(Path("{dir}")))


@pytest.fixture
def start_paused(tmp_path):
    """start_paused(out): train.py on the debug recipe with W&B offline, held after its save at step PAUSE_AT;
    returns the process (in its own session) once it is held there, and the path of its stderr. A process still
    there when the test ends (it failed) is killed with everything it started."""
    started = []

    def start(out):
        err = tmp_path / f"{out.name}.stderr"
        with open(err, "w") as f:
            proc = subprocess.Popen(command("train.py", [*DEBUG, f"output_dir={out}"]), cwd=ROOT,
                                    env=env(**wandb_env(tmp_path, CIFAR_FAULT=f"pause-after-save:{PAUSE_AT}")),
                                    stdout=subprocess.DEVNULL, stderr=f, start_new_session=True)
        started.append(proc)
        while "paused until SIGUSR2" not in err.read_text():
            assert proc.poll() is None, f"train.py exited {proc.returncode} before its pause\n{err.read_text()[-3000:]}"
            time.sleep(0.05)
        return proc, err

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def finish(proc, err, timeout=180) -> str:
    proc.wait(timeout=timeout)
    return err.read_text()


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def untimed(rows):
    """metrics.jsonl rows without the timing fields, which differ between any two runs."""
    return [{k: v for k, v in r.items() if k not in ("images_per_sec", "epoch_time", "data_wait")} for r in rows]


@pytest.mark.slow
def test_debug_run_writes_one_readable_run(wandb_debug):
    out = wandb_debug
    (run_dir,) = runs_in(out)
    s = leet(run_dir, summary=True)
    assert s["config"]["optim"]["lr"] == DEBUG_LR and s["config"]["schedule"]["name"] == "cosine"
    assert s["config"]["run"]["world_size"] == 1 and s["config"]["run"]["global_batch_size"] == 32
    summary = read_json(out / "summary.json")
    assert s["summary"]["final_test_acc"] == pytest.approx(summary["final_test_acc"])
    assert summary["wandb_run_id"] == s["run_id"]
    rows = history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in train] == list(range(4, 193, 4))
    assert all("lr" in r for r in train)
    logged = {r["step"]: r["train/loss"] for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r}
    assert {r["global_step"]: r["train/loss"] for r in train} == pytest.approx(logged)   # metrics.jsonl's curve
    test = [r for r in rows if "test/acc" in r]
    assert [r["global_step"] for r in test] == [64, 128, 192]
    assert any(k.startswith("test/samples") for r in rows for k in r)
    (meta,) = [r["run"] for r in leet(run_dir) if r["type"] == "run"]
    assert meta["run_group"] == "debug" and meta["job_type"] == "train" and sorted(meta["tags"]) == ["ci", "debug"]
    assert "warning: W&B" not in (out.parent / f"{out.name}.stderr").read_text()
    for path in [*files_under(out), *files_under(out.parent / f"{out.name}.env")]:   # the run, W&B's home
        with open(path, "rb") as f:
            assert SENTINEL_KEY.encode() not in f.read(), path


@pytest.mark.slow
def test_two_processes_write_exactly_one_run_and_only_rank_0_imports_wandb(tmp_path):
    """A real 2-process run: one W&B run, and rank 1 never imports wandb (each rank records sys.modules as it
    exits, through a sitecustomize on its PYTHONPATH)."""
    probe = tmp_path / "probe"
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(RANKS_PROBE)
    out = tmp_path / "r"
    run("train.py", *DEBUG, "train.epochs=1", f"output_dir={out}", procs=2,
        **wandb_env(tmp_path, PYTHONPATH=f"{probe}{os.pathsep}{ROOT}", RANKS_PROBE_DIR=str(probe)))
    assert len(runs_in(out)) == 1
    assert not glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True)[1:]
    ranks = {name: json.loads((probe / name).read_text()) for name in ("rank0.json", "rank1.json")}
    assert ranks["rank0.json"]["pid"] != ranks["rank1.json"]["pid"]
    assert ranks["rank0.json"]["wandb"] is True and ranks["rank1.json"]["wandb"] is False


@pytest.mark.slow
def test_resume_continues_the_same_run_past_the_checkpoint(tmp_path, baseline, start_paused):
    """SIGTERM while held after the save at step 64: a checkpoint at step 65, exit 75; the resume logs into a run
    with the same id, the two runs' curves together are every logged step once, and the weights are those of the
    uninterrupted run."""
    out = tmp_path / "r"
    proc, err = start_paused(out)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGUSR2)
    finish(proc, err)
    assert proc.returncode == 75, err.read_text()[-3000:]
    stopped = read_json(out / "status.json")["step"]
    assert stopped == PAUSE_AT + 1                    # the step boundary after the hold
    run("train.py", *DEBUG, f"output_dir={out}", **wandb_env(tmp_path))
    first, second = runs_in(out)
    id1, id2 = leet(first, summary=True)["run_id"], leet(second, summary=True)["run_id"]
    assert id1 == id2
    before = [r["global_step"] for r in history(first) if "train/loss" in r]
    steps = [r["global_step"] for r in history(second) if "train/loss" in r]
    assert steps[0] > stopped - 4 and steps[0] == (stopped // 4 + 1) * 4 and steps[-1] == 192
    assert before + steps == list(range(4, 193, 4))
    assert same_weights(out, baseline(*DEBUG))
    assert sync_folders(out) == [first, second]        # what docs/wandb.md's sync command names: this one run


def sync_folders(out) -> list[str]:
    """The folders docs/wandb.md's `wandb sync` command for a resumed offline run names, for the run folder out, in
    the order the shell passes them."""
    with open(os.path.join(ROOT, "docs", "wandb.md")) as f:
        (line,) = [line.strip() for line in f if line.startswith("wandb sync ")]
    *words, pattern = shlex.split(line)
    assert words == ["wandb", "sync"], line
    return sorted(glob.glob(pattern.replace("<run>", str(out))))


@pytest.mark.slow
def test_a_crash_of_the_wandb_backend_warns_once_and_training_goes_on(tmp_path, baseline, start_paused):
    """wandb-core, W&B's backend process, SIGKILLed mid-run (while training is held after its save at step 64):
    one `warning: W&B` line and nothing else (no exit-time traceback), exit 0, metrics.jsonl and summary.json
    complete, and the weights of the run without W&B, bit for bit."""
    out = tmp_path / "r"
    proc, err = start_paused(out)
    (core,) = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "wandb-core"]
    core.kill()
    while core.is_running() and core.status() != psutil.STATUS_ZOMBIE:   # train.py, held, reaps it only later
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR2)
    stderr = finish(proc, err)
    assert proc.returncode == 0, stderr[-3000:]
    warnings = [line for line in stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1 and "Connection" in warnings[0], stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    plain = baseline(*DEBUG)
    assert untimed(read_jsonl(out / "metrics.jsonl")) == untimed(read_jsonl(plain / "metrics.jsonl"))
    assert read_json(out / "summary.json")["final_test_acc"] == read_json(plain / "summary.json")["final_test_acc"]
    assert read_json(out / "status.json")["state"] == "finished"
    assert same_weights(out, plain)


@pytest.mark.slow
def test_disabled_writes_nothing(tmp_path, monkeypatch):
    out = tmp_path / "r"
    for key, value in wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    train_main([*DEBUG, "train.max_steps=4", "wandb.mode=disabled", f"output_dir={out}"])
    assert read_json(out / "status.json")["state"] == "finished"
    assert not os.path.exists(out / "wandb") and not runs_in(out)


@pytest.mark.slow
def test_unusable_wandb_warns_once_and_training_completes(tmp_path, monkeypatch, caplog):
    """A file where W&B wants its folder: found before wandb is imported, so this runs in-process."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where W&B wants a folder")
    out = tmp_path / "r"
    for key, value in wandb_env(tmp_path, WANDB_DIR=str(blocker)).items():
        monkeypatch.setenv(key, value)
    train_main([*DEBUG, "train.epochs=1", "train.log_every_steps=16", f"output_dir={out}"])
    warnings = [line for line in logged_warnings(caplog).splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1
    assert read_json(out / "summary.json")["final_test_acc"] is not None
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines()]) == 5


@pytest.mark.slow
def test_evaluate_logs_an_eval_run_or_into_the_training_run(tmp_path, wandb_debug):
    out = tmp_path / "r"
    shutil.copytree(wandb_debug, out)
    train_id = read_json(out / "summary.json")["wandb_run_id"]
    run("evaluate.py", "--checkpoint", str(out), "--output", str(tmp_path / "e1"), **wandb_env(tmp_path))
    (eval_run,) = runs_in(tmp_path / "e1")
    s = leet(eval_run, summary=True)
    assert s["run_id"] != train_id and s["summary"]["eval/acc"] == read_json(tmp_path / "e1" / "eval.json")["accuracy"]
    (meta,) = [r["run"] for r in leet(eval_run) if r["type"] == "run"]
    assert meta["job_type"] == "eval" and meta["run_group"] == "debug"
    run("evaluate.py", "--checkpoint", str(out), "--tta", "--wandb-into-train-run", "--output", str(tmp_path / "e2"),
        **wandb_env(tmp_path))
    (into,) = runs_in(tmp_path / "e2")
    assert leet(into, summary=True)["run_id"] == train_id


# --- What the user set, and where W&B stages what it logs ------------------------------------------------------------
STAGED = (*DEBUG, "data.limit_train=256", "data.limit_test=128", "train.epochs=1", "wandb.log_model=final")


WANDB_HOMES = ("WANDB_DATA_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_ARTIFACT_DIR", "WANDB_DIR")


def private_home_env(folder, **extra):
    """W&B offline with only a private HOME: none of WANDB_HOMES (the run's environment is this process's,
    conftest.env), so wandb's own defaults under HOME apply unless the tracker stages elsewhere."""
    assert not [name for name in WANDB_HOMES if name in os.environ], "unset these for the staging tests"
    return dict(HOME=f"{folder}/home", WANDB_MODE="offline", WANDB_API_KEY=SENTINEL_KEY, **extra)


@pytest.fixture
def wandb_staged(baseline):
    """A short debug run with W&B offline, a private HOME and WANDB_PROJECT=elsewhere, logging its final model:
    trained once per session; read-only."""
    return baseline(*STAGED, **private_home_env("{dir}", WANDB_PROJECT="elsewhere"))


@pytest.mark.slow
def test_everything_the_run_logs_is_staged_inside_the_run_folder(wandb_staged):
    """Tables, their images and the model artifact are staged under <run>/wandb, so copying the run folder carries
    all that `wandb sync` uploads; nothing is written under HOME."""
    out = wandb_staged
    (run_dir,) = runs_in(out)
    artifacts = [r["artifact"] for r in leet(run_dir) if r["type"] == "artifact"]
    assert {a["type"] for a in artifacts} == {"run_table", "model"}
    staged = [c["local_path"] for a in artifacts for c in a["manifest"]["contents"]]
    assert any(c["path"].startswith("media/images/") for a in artifacts for c in a["manifest"]["contents"])
    assert staged and all(p.startswith(f"{out}{os.sep}wandb{os.sep}") and os.path.isfile(p) for p in staged)
    assert files_under(out.parent / f"{out.name}.env" / "home") == []


@pytest.mark.slow
def test_wandb_project_lands_the_run_in_that_project(wandb_staged):
    out = wandb_staged
    (run_dir,) = runs_in(out)
    (meta,) = [r["run"] for r in leet(run_dir) if r["type"] == "run"]
    assert meta["project"] == "elsewhere"
    assert yaml.safe_load((out / "config.yaml").read_text())["wandb"]["project"] == "elsewhere"
    assert leet(run_dir, summary=True)["config"]["wandb"]["project"] == "elsewhere"
    assert ("warning: wandb.project=elsewhere from $WANDB_PROJECT=elsewhere wins over the recipe's cifar10; set "
            "wandb.project on train.py's command line to choose") in (out.parent / f"{out.name}.stderr").read_text()


@pytest.mark.slow
def test_an_explicit_wandb_project_beats_wandb_project_with_a_line(tmp_path):
    out = tmp_path / "r"
    proc = run("train.py", *DEBUG, "train.max_steps=2", "data.limit_test=64", "wandb.project=mine",
               f"output_dir={out}", **private_home_env(tmp_path, WANDB_PROJECT="elsewhere"))
    (run_dir,) = runs_in(out)
    (meta,) = [r["run"] for r in leet(run_dir) if r["type"] == "run"]
    assert meta["project"] == "mine"
    assert [line for line in proc.stderr.splitlines() if "WANDB_PROJECT" in line] == [
        "warning: wandb.project=mine from train.py's command line wins over $WANDB_PROJECT=elsewhere"]
