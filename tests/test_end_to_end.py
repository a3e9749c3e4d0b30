"""What a new user does first: the debug recipe, then evaluate.py on its output."""
import os
import re

import pytest
import yaml
from conftest import ROOT, read_json, read_jsonl, run
from PIL import Image


def _png(path, min_size):
    img = Image.open(path)
    img.load()
    assert img.format == "PNG" and img.width >= min_size[0] and img.height >= min_size[1]
    colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50          # a real figure, not a blank canvas
    return img


@pytest.mark.slow
def test_debug_recipe_then_evaluate(tmp_path):
    out = tmp_path / "debug"
    proc = run("train.py", "--config", "configs/debug.yaml", f"output_dir={out}")
    assert "final_test_acc" in proc.stdout and "run folder" in proc.stdout

    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["name"] == "debug" and cfg["data"]["source"] == "synthetic" and cfg["output_dir"] == str(out)

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


def test_evaluate_refuses_a_folder_without_a_run(tmp_path):
    proc = run("evaluate.py", "--checkpoint", str(tmp_path), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and str(tmp_path) in proc.stderr


@pytest.mark.slow
def test_evaluate_refuses_weights_of_another_model(tmp_path):
    out = tmp_path / "r"
    run("train.py", "--config", "configs/debug.yaml", "train.max_steps=2", f"output_dir={out}")
    proc = run("evaluate.py", "--checkpoint", str(out), "model.name=resnet18", check=False)
    assert proc.returncode == 2 and "do not fit model" in proc.stderr and "Traceback" not in proc.stderr


def test_default_output_dir_is_named_after_the_recipe(tmp_path):
    run("train.py", "--config", os.path.join(ROOT, "configs", "debug.yaml"), "train.max_steps=2", "name=e2e",
        cwd=str(tmp_path))
    made = list((tmp_path / "runs").glob("e2e-*"))
    assert len(made) == 1 and (made[0] / "model.safetensors").exists()
    assert re.fullmatch(r"e2e-\d{8}-\d{6}", made[0].name)
