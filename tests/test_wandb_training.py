"""W&B from real training runs (offline mode, read back with `wandb leet inspect`)."""
import glob
import os
import signal

import pytest
from conftest import read_json, run
from test_checkpoint import launch, steps_of, wait_for
from test_tracking import DEBUG_LR, SENTINEL_KEY, files_under, history, leet

RECIPE = ["--config", "configs/debug.yaml", "train.log_every_steps=16"]


def wandb_env(tmp_path, **extra):
    home = tmp_path / "home"
    return dict(HOME=str(home), WANDB_CONFIG_DIR=str(home / "config"), WANDB_CACHE_DIR=str(home / "cache"),
                WANDB_DATA_DIR=str(home / "data"), WANDB_MODE="offline", WANDB_API_KEY=SENTINEL_KEY, **extra)


def runs_in(out):
    return sorted(glob.glob(os.path.join(out, "wandb", "offline-run-*")))


@pytest.mark.slow
def test_debug_run_writes_one_readable_run(tmp_path):
    out = tmp_path / "r"
    run("train.py", *RECIPE, f"output_dir={out}", "wandb.tags=[ci, debug]", **wandb_env(tmp_path))
    (run_dir,) = runs_in(out)
    s = leet(run_dir, summary=True)
    assert s["config"]["optim"]["lr"] == DEBUG_LR and s["config"]["schedule"]["name"] == "cosine"
    assert s["config"]["run"]["world_size"] == 1 and s["config"]["run"]["global_batch_size"] == 32
    summary = read_json(out / "summary.json")
    assert s["summary"]["final_test_acc"] == pytest.approx(summary["final_test_acc"])
    assert summary["wandb_run_id"] == s["run_id"]
    rows = history(run_dir)
    train = [r for r in rows if "train/loss" in r]
    assert [r["global_step"] for r in train] == list(range(16, 193, 16))
    assert all("lr" in r for r in train)
    test = [r for r in rows if "test/acc" in r]
    assert [r["global_step"] for r in test] == [64, 128, 192]
    assert any(k.startswith("test/samples") for r in rows for k in r)
    (meta,) = [r["run"] for r in leet(run_dir) if r["type"] == "run"]
    assert meta["run_group"] == "debug" and meta["job_type"] == "train" and sorted(meta["tags"]) == ["ci", "debug"]
    for path in files_under(tmp_path):                     # the key appears in nothing the run wrote
        with open(path, "rb") as f:
            assert SENTINEL_KEY.encode() not in f.read(), path


@pytest.mark.slow
def test_two_processes_write_exactly_one_run(tmp_path):
    out = tmp_path / "r"
    run("train.py", *RECIPE, "train.epochs=1", f"output_dir={out}", procs=2, **wandb_env(tmp_path))
    assert len(runs_in(out)) == 1
    assert not glob.glob(str(tmp_path / "**" / "offline-run-*"), recursive=True)[1:]


@pytest.mark.slow
def test_resume_continues_the_same_run_past_the_checkpoint(tmp_path):
    out = tmp_path / "r"
    args = [*RECIPE, "data.limit_train=16384", "checkpoint.every_steps=16", f"output_dir={out}"]   # 1536 steps
    proc = launch(args, **wandb_env(tmp_path))
    wait_for(lambda: max(steps_of(out), default=0) >= 48, proc=proc)
    assert proc.poll() is None, "the run ended before it could be signalled"
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 75
    stopped = read_json(out / "status.json")["step"]
    run("train.py", *args, **wandb_env(tmp_path))
    first, second = runs_in(out)
    id1, id2 = leet(first, summary=True)["run_id"], leet(second, summary=True)["run_id"]
    assert id1 == id2
    steps = [r["global_step"] for r in history(second) if "train/loss" in r]
    assert steps[0] > stopped - 16 and steps[0] == (stopped // 16 + 1) * 16 and steps[-1] == 1536


@pytest.mark.slow
def test_disabled_writes_nothing(tmp_path):
    out = tmp_path / "r"
    run("train.py", *RECIPE, "train.max_steps=4", "wandb.mode=disabled", f"output_dir={out}",
        **wandb_env(tmp_path))
    assert not os.path.exists(out / "wandb") and not runs_in(out)


@pytest.mark.slow
def test_unusable_wandb_warns_once_and_training_completes(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where W&B wants a folder")
    out = tmp_path / "r"
    proc = run("train.py", *RECIPE, "train.epochs=1", f"output_dir={out}", **wandb_env(tmp_path, WANDB_DIR=str(blocker)))
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning: W&B")]
    assert len(warnings) == 1
    assert read_json(out / "summary.json")["final_test_acc"] is not None
    assert len([line for line in (out / "metrics.jsonl").read_text().splitlines()]) == 5


@pytest.mark.slow
def test_evaluate_logs_an_eval_run_or_into_the_training_run(tmp_path):
    out = tmp_path / "r"
    run("train.py", *RECIPE, "train.epochs=1", f"output_dir={out}", **wandb_env(tmp_path))
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
