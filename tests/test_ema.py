"""train.ema: a moving average of the weights (AveragedModel), evaluated beside them, saved in checkpoints and beside
the final weights, restored bitwise on resume, the same under DDP as with one process and the double batch."""
from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from cifar.checkpoint import verify
from cifar.errors import cli
from cifar.evaluate_cli import evaluate_run
from conftest import double_batch_pair, max_diff, read_json, read_jsonl, run, weights
from inprocess import train_here

TINY = ["--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=128", "train.epochs=2",
        "train.ema.decay=0.8", "train.ema.every_steps=2", "checkpoint.every_steps=4"]


def ema(run_dir) -> dict:
    return load_file(os.path.join(run_dir, "model-ema.safetensors"))


def equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("ema") / "run"
    run("train.py", *TINY, f"output_dir={out}")
    return out


@pytest.mark.slow
def test_the_average_is_evaluated_saved_and_labelled(uninterrupted, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    rows = [r for r in read_jsonl(uninterrupted / "metrics.jsonl") if "epoch_time" in r]
    assert all("test/ema_acc" in r and "test/ema_loss" in r for r in rows)
    summary = read_json(uninterrupted / "summary.json")
    assert summary["final_ema_test_acc"] == rows[-1]["test/ema_acc"]
    assert summary["best_ema_test_acc"] == max(r["test/ema_acc"] for r in rows)
    with safe_open(str(uninterrupted / "model-ema.safetensors"), "pt") as f:
        assert f.metadata() == {"weights": "ema", "ema_decay": "0.8", "ema_updates": "8"}   # 16 steps, every 2nd
    with safe_open(str(uninterrupted / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"weights": "trained"}
    assert not equal(ema(uninterrupted), weights(uninterrupted))          # an average, not a copy
    kept = sorted((uninterrupted / "checkpoints").glob("step-*"))
    assert kept and all((p / "model-ema.safetensors").is_file() and verify(str(p)) is None for p in kept)
    manifest = json.load(open(kept[-1] / "manifest.json"))
    assert "model-ema.safetensors" in manifest["files"]                  # its SHA-256 is checked on resume
    # evaluate.py --pick ema (its code, in this process) scores exactly what training logged for the average
    capsys.readouterr()
    evaluate_run(str(uninterrupted), [], "none", str(tmp_path / "e"), pick="ema")
    assert "the moving average of the weights" in capsys.readouterr().out
    report = json.load(open(tmp_path / "e" / "eval.json"))
    assert report["weights"] == "ema" and report["accuracy"] == rows[-1]["test/ema_acc"]


@pytest.mark.slow
def test_kill_and_resume_ends_with_the_uninterrupted_average_bitwise(uninterrupted, tmp_path):
    out = tmp_path / "run"
    killed = run("train.py", *TINY, f"output_dir={out}", check=False, CIFAR_FAULT="kill-after-save:4")
    assert killed.returncode == -9
    run("train.py", *TINY, f"output_dir={out}")
    assert equal(ema(out), ema(uninterrupted)) and equal(weights(out), weights(uninterrupted))
    # and the restore matters: the average resumed from the step-4 checkpoint, not restarted from the weights
    with safe_open(str(out / "model-ema.safetensors"), "pt") as f:
        assert f.metadata()["ema_updates"] == "8"


@pytest.mark.slow
def test_two_processes_equal_one_process_with_the_double_batch(baseline):
    # the session's pair that test_equivalence compares too: batch 12 on 1 process, 6 on each of 2, train.ema on
    one, two = double_batch_pair(baseline)
    assert max_diff(ema(one), ema(two)) <= 1e-5
    one, two = (read_json(d / "summary.json") for d in (one, two))
    assert one["final_ema_test_acc"] == two["final_ema_test_acc"]


@pytest.mark.slow
def test_resuming_a_checkpoint_without_an_average_starts_one(tmp_path):
    out = tmp_path / "run"
    plain = [a for a in TINY if not a.startswith("train.ema")]
    run("train.py", *plain, f"output_dir={out}", check=False, CIFAR_FAULT="kill-after-save:4")
    proc = run("train.py", *TINY, f"output_dir={out}")
    notes = [line for line in proc.stderr.splitlines() if "moving average" in line]
    assert len(notes) == 1 and notes[0].startswith("warning: checkpoint ") and "starts from the resumed" in notes[0]
    with safe_open(str(out / "model-ema.safetensors"), "pt") as f:
        assert f.metadata()["ema_updates"] == "6"      # steps 6, 8, ..., 16 after the resume at step 4


def test_no_average_to_pick_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    train_here(*[a for a in TINY if not a.startswith("train.ema")], "train.epochs=1", f"output_dir={out}")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli(evaluate_run)(str(out), [], "none", None, pick="ema")     # evaluate.py --checkpoint <out> --pick ema
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.count("\n") == 1 and "trained without train.ema" in stderr
