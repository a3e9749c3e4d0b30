"""What a new user does first: the debug recipe, then evaluate.py on its output."""
import os
import re
import shutil

import pytest
import yaml
from conftest import DEBUG, ROOT, read_json, read_jsonl, run
from inprocess import call, refusal
from PIL import Image


def _png(path, min_size):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.width >= min_size[0] and img.height >= min_size[1]
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50          # a real figure, not a blank canvas
    return img


@pytest.mark.slow
def test_debug_recipe_then_evaluate(tmp_path, baseline):
    """The debug run (the shared 192-step baseline: the recipe, with checkpoints every 8 steps and a log row every
    4), then evaluate.py on it through real processes: the command line a new user types."""
    trained = baseline(*DEBUG)
    stdout = open(f"{trained}.stdout").read()
    assert "final_test_acc" in stdout and f"run folder: {trained}" in stdout
    cfg = yaml.safe_load((trained / "config.yaml").read_text())
    assert cfg["name"] == "debug" and cfg["data"]["source"] == "synthetic" and cfg["output_dir"] == str(trained)
    out = tmp_path / "debug"
    shutil.copytree(trained, out)                 # evaluate.py writes beside the weights: the baseline stays as it is

    rows = read_jsonl(out / "metrics.jsonl")
    assert all("step" in r and "epoch" in r for r in rows)
    evals = [r for r in rows if "test/acc" in r]
    assert [r["epoch"] for r in evals] == [0, 1, 2]
    assert set(evals[-1]["test/per_class"]) == {"plane", "car", "bird", "cat", "deer", "dog", "frog", "horse",
                                                "ship", "truck"}
    assert evals[-1]["test/count"] == 512
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps)

    summary = read_json(out / "summary.json")
    for key in ("final_test_acc", "best_test_acc", "per_class_acc", "wall_seconds", "images_per_sec", "world_size",
                "mixed_precision"):
        assert key in summary
    assert summary["final_test_acc"] == evals[-1]["test/acc"]
    assert summary["best_test_acc"] == max(r["test/acc"] for r in evals)
    assert summary["final_test_acc"] > 40        # synthetic classes are learnable: training really trains

    proc = run("evaluate.py", "--checkpoint", str(out), "--tta")
    assert "Accuracy of the network on the 512 test images" in proc.stdout
    assert proc.stdout.count("Accuracy of ") == 11
    report = read_json(out / "eval.json")
    assert report["count"] == 512 and report["tta"] == "flip" and len(report["per_class"]) == 10
    assert sum(map(sum, report["confusion"])) == 512
    _png(out / "confusion.png", (600, 500))
    _png(out / "predictions.png", (600, 200))

    # without TTA the evaluation reproduces the run's own final test accuracy
    run("evaluate.py", "--checkpoint", str(out / "model.safetensors"), "--output", str(tmp_path / "plain"))
    assert read_json(tmp_path / "plain" / "eval.json")["accuracy"] == pytest.approx(summary["final_test_acc"])


@pytest.mark.slow
def test_bf16_autocast_trains_on_cpu(tmp_path):
    out = tmp_path / "bf16"
    run("train.py", "--config", "configs/debug.yaml", "train.mixed_precision=bf16", "train.epochs=2",
        f"output_dir={out}")
    summary = read_json(out / "summary.json")
    assert summary["mixed_precision"] == "bf16"
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert all(r["train/loss"] == r["train/loss"] for r in rows)      # finite, not NaN
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]


def test_evaluate_refuses_a_folder_without_a_run(tmp_path, capsys):
    line = refusal(capsys, "evaluate.py", "--checkpoint", tmp_path)
    # the problem (the folder named, what it lacks), then the fix
    assert line.startswith(f"error: no weights at {tmp_path} (need model.safetensors and config.yaml); pass a run "
                           f"folder written by train.py"), line
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_evaluate_refuses_weights_of_another_model(tmp_path, baseline):
    """The real process: evaluate.py's exit status and its one line, nothing else on stderr."""
    out = baseline(*DEBUG)
    proc = run("evaluate.py", "--checkpoint", str(out), "model.name=resnet18", "--output", str(tmp_path / "eval"),
               check=False)
    assert proc.returncode == 2 and "do not fit model" in proc.stderr and "Traceback" not in proc.stderr
    lines = proc.stderr.splitlines()
    assert lines == [f"error: weights in {out / 'model.safetensors'} do not fit model ResNet18 (first mismatch: "
                     f"fc.bias missing from the file); use the run's own config or the right checkpoint"], lines
    assert proc.stdout == ""
    assert not (tmp_path / "eval").exists()


def test_default_output_dir_is_named_after_the_recipe(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    call("train.py", "--config", os.path.join(ROOT, "configs", "debug.yaml"), "train.max_steps=2",
         "data.limit_test=64", "name=e2e")
    made = list((tmp_path / "runs").glob("e2e-*"))
    assert len(made) == 1 and (made[0] / "model.safetensors").exists()
    assert re.fullmatch(r"e2e-\d{8}-\d{6}", made[0].name)
    assert read_json(made[0] / "summary.json")["steps"] == 2 and os.listdir(tmp_path) == ["runs"]
