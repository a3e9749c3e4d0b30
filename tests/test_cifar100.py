"""CIFAR-100 (data.dataset=cifar100): its official pickle layout (written by the tests, offline), every model's head
sized by the dataset, readable reports and plots for 100 classes, and the one-line refusals (exit code 2) of data or
weights of the other dataset."""
import glob
import hashlib
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from conftest import ROOT, read_json, run, write_cifar, write_cifar100
from inprocess import train_here
from PIL import Image
from safetensors.torch import save_file

from cifar.config import DataConfig, config_from_dict, load_config
from cifar.data import (CIFAR100_CLASSES, CIFAR100_MD5, CIFAR100_URL, CLASSES, class_names, load_split, prepare,
                        synthetic_split)
from cifar.errors import UserError, cli
from cifar.evaluate_cli import evaluate_run, per_class_report
from cifar.export import main as export_main
from cifar.models import MODELS, build_model
from cifar.plots import confusion_png, predictions_figure
from cifar.predict_cli import predict_images


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
    return lines[0]


def test_reads_the_official_cifar100_layout_with_the_meta_files_names(tmp_path):
    names = [f"thing_{i}" for i in range(100)]
    root = write_cifar100(str(tmp_path), n_train=30, n_test=12, classes=names)
    cfg = DataConfig(dataset="cifar100", root=root)
    train, test = load_split(cfg, train=True), load_split(cfg, train=False)
    assert train.images.shape == (30, 3, 32, 32) and test.images.shape == (12, 3, 32, 32)
    assert train.classes == test.classes == tuple(names) == class_names(cfg)
    assert load_split(DataConfig(dataset="cifar100", root=root, limit_train=7), train=True).labels.shape == (7,)
    # no meta file at hand (predict.py elsewhere), or synthetic data: the built-in fine names, CIFAR-100's own
    assert class_names(DataConfig(dataset="cifar100", root=str(tmp_path / "none"))) == CIFAR100_CLASSES
    assert len(CIFAR100_CLASSES) == len(set(CIFAR100_CLASSES)) == 100
    # CIFAR-10 keeps the tutorial's short names, not its meta file's (airplane, automobile, ...)
    assert class_names(DataConfig(root=write_cifar(str(tmp_path), 10, 5))) == CLASSES


def test_synthetic_data_for_both_datasets():
    small = load_split(DataConfig(source="synthetic", limit_train=500), train=True)
    assert small.classes == CLASSES and set(small.labels) == set(range(10))
    big = load_split(DataConfig(source="synthetic", dataset="cifar100", limit_train=2000), train=True)
    assert big.classes == CIFAR100_CLASSES and set(big.labels) == set(range(100))
    assert np.array_equal(synthetic_split(2000, True, 100).images, big.images)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_models_head_is_sized_by_the_dataset(name):
    for classes in (10, 100):
        net = build_model(name, classes).eval()
        with torch.no_grad():
            assert net(torch.randn(2, 3, 32, 32)).shape == (2, classes)


def test_the_recipe_and_saved_configs():
    cfg = load_config(os.path.join(ROOT, "configs", "resnet18-cifar100.yaml"))
    assert (cfg.data.dataset, cfg.model.name, cfg.data.normalize) == ("cifar100", "resnet18", "cifar")
    saved = load_config(None).to_dict()
    del saved["data"]["dataset"]                         # a run from before data.dataset: CIFAR-10
    assert config_from_dict(saved).data.dataset == "cifar10"
    assert load_config(None, ["data.source=files"]).data.source == "files"
    with pytest.raises(UserError, match="data.dataset"):
        load_config(None, ["data.dataset=cifar1000"])


def test_the_official_archive_is_md5_checked_and_so_is_a_mirror(tmp_path, monkeypatch):
    """As CIFAR-10: the official URL and $CIFAR100_URL (a mirror) are both checked against the official MD5, unless
    $CIFAR100_MD5 names another archive's (then the archive is kept and opened)."""
    calls = []

    def fake_fetch(url, archive):
        calls.append(url)
        with open(archive + ".part", "wb") as f:
            f.write(b"not the archive")
        return hashlib.md5(b"not the archive").hexdigest()

    monkeypatch.setattr("cifar.download.fetch", fake_fetch)
    monkeypatch.delenv("CIFAR100_URL", raising=False)
    monkeypatch.delenv("CIFAR100_MD5", raising=False)
    cfg = DataConfig(dataset="cifar100", root=str(tmp_path))
    with pytest.raises(UserError, match=f"{CIFAR100_URL} sent an archive with MD5 .*, not {CIFAR100_MD5}"):
        prepare(cfg)
    monkeypatch.setenv("CIFAR100_URL", "http://mirror.example/cifar-100-python.tar.gz")
    with pytest.raises(UserError, match=f"mirror.example/cifar-100-python.tar.gz sent .*, not {CIFAR100_MD5}"):
        prepare(cfg)
    assert calls == [CIFAR100_URL, "http://mirror.example/cifar-100-python.tar.gz"]
    assert os.listdir(tmp_path) == []                        # refused archives are not kept
    monkeypatch.setenv("CIFAR100_MD5", hashlib.md5(b"not the archive").hexdigest())
    with pytest.raises(UserError, match="cifar-100-python.tar.gz is damaged or not a .tar.gz"):
        prepare(cfg)
    assert CIFAR100_MD5 == "eb9058c3a382ffc7106e4002c42a8d85"


def test_the_report_shows_best_and_worst_ten_of_100_and_all_of_10():
    accs = {name: float(i) for i, name in enumerate(CIFAR100_CLASSES)}
    lines = per_class_report(10000, 49.5, accs).splitlines()
    assert lines[0] == "Accuracy of the network on the 10000 test images: 49.50 %"
    assert len(lines) == 1 + 2 * 11
    assert lines[1] == "The best 10 of 100 classes (all in eval.json):"
    assert lines[2] == f"Accuracy of {'worm':>13s} :  99.0 %" and "woman" in lines[3]
    assert lines[12] == "The worst 10 of 100 classes (all in eval.json):"
    assert lines[13] == f"Accuracy of {'apple':>13s} :   0.0 %" and lines[22].endswith(":   9.0 %")
    ten = per_class_report(37, 40.0, {name: 40.0 for name in CLASSES}).splitlines()
    assert ten[1:] == [f"Accuracy of {name:>5s} :  40.0 %" for name in CLASSES]     # the tutorial's lines


def test_a_100_class_confusion_png_renders(tmp_path):
    rng = np.random.default_rng(0)
    cm = rng.integers(0, 5, (100, 100)) + np.diag(rng.integers(0, 100, 100))
    path = tmp_path / "confusion.png"
    confusion_png(cm.tolist(), str(path), "100 classes", CIFAR100_CLASSES)
    with Image.open(path) as png:
        png.load()
        width, height = png.size
        pixels = np.asarray(png.convert("RGB"))
    assert width >= 1500 and height >= 1400                   # bigger than the 10-class figure (840x720)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # a real picture, not a blank canvas
    fig = predictions_figure(rng.random((4, 3, 32, 32)), [1, 41, 58, 99], [1, 2, 3, 99], classes=CIFAR100_CLASSES)
    assert [ax.get_title() for ax in fig.axes if ax.images][1] == "lawn_mower /\nbaby"


@pytest.mark.slow
def test_wandb_confusion_and_samples_use_the_runs_class_names(tmp_path):
    """A real offline W&B run of a CIFAR-100 debug run (synthetic data): its confusion matrix and samples table,
    read back from the run's files, are named with CIFAR-100's classes."""
    out = tmp_path / "run"
    run("train.py", "--config", "configs/debug.yaml", "data.dataset=cifar100", "data.limit_train=256",
        "data.limit_test=128", "train.epochs=1", f"output_dir={out}", WANDB_MODE="offline")
    (tables,) = glob.glob(str(out / "wandb" / "offline-run-*" / "files" / "media" / "table" / "test"))
    (samples,) = glob.glob(os.path.join(tables, "samples_*.table.json"))
    (confusion,) = glob.glob(os.path.join(tables, "confusion_table_*.table.json"))
    samples, confusion = json.load(open(samples)), json.load(open(confusion))
    assert samples["columns"] == ["image", "true", "predicted", "correct"] and samples["data"]
    assert all(row[1] in CIFAR100_CLASSES and row[2] in CIFAR100_CLASSES for row in samples["data"])
    assert len(confusion["data"]) == 100 * 100
    assert {row[0] for row in confusion["data"]} == set(CIFAR100_CLASSES)


def fake_run(folder, overrides, net):
    """A run folder as train.py leaves it (config.yaml + model.safetensors), with the given network's weights."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        f.write(load_config(None, overrides).to_yaml())
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    return folder


def refused_here(capsys, call, *args) -> str:
    """An entry point's refusal, in this process: exit 2 and one `error:` line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        call(*args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err[-3000:]
    return one_line_error(subprocess.CompletedProcess(args, 2, "", err))


def test_data_and_weights_of_the_other_dataset_are_one_line_each(tmp_path, capsys, monkeypatch):
    """Labels outside 0..99; a CIFAR-10 folder given as CIFAR-100 and the reverse; a CIFAR-100 run evaluated as
    CIFAR-10; a bare .pth with a 100-class head evaluated as CIFAR-10; a CIFAR-100 run exported for the tutorial."""
    c10 = write_cifar(str(tmp_path / "c10"), n_train=20, n_test=10)
    c100 = write_cifar100(str(tmp_path / "c100"), n_train=20, n_test=10)
    bad = write_cifar100(str(tmp_path / "bad"), n_train=20, n_test=10, top=120, seed=3)
    run100 = fake_run(str(tmp_path / "run100"), ["data.dataset=cifar100", f"data.root={c100}"],
                      build_model("tutorial_net", 100))
    pth = str(tmp_path / "net100.pth")
    torch.save(build_model("tutorial_net", 100).state_dict(), pth)
    train = ["--config", "configs/tutorial.yaml", "data.num_workers=0", "data.download=false", "train.epochs=1"]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    labels = refused_here(capsys, train_here, *train, "data.dataset=cifar100", f"data.root={bad}",
                          f"output_dir={tmp_path}/o1")
    c10_as_100 = refused_here(capsys, train_here, *train, "data.dataset=cifar100", f"data.root={c10}",
                              f"output_dir={tmp_path}/o2")
    c100_as_10 = refused_here(capsys, train_here, *train, f"data.root={c100}", f"output_dir={tmp_path}/o3")
    evaluate = cli(evaluate_run)                               # evaluate.py --checkpoint ... [overrides]
    run_as_10 = refused_here(capsys, evaluate, run100, ["data.dataset=cifar10", f"data.root={c10}"], "none", None)
    pth_as_10 = refused_here(capsys, evaluate, pth, [f"data.root={c10}"], "none", None)
    export = refused_here(capsys, export_main, ["--checkpoint", run100, "--format", "tutorial"])
    assert "labels outside 0..99" in labels and "the data is not CIFAR-100" in labels
    assert ("data.dataset=cifar100 asks for CIFAR-100" in c10_as_100 and "CIFAR-10 files" in c10_as_100
            and "set data.dataset=cifar10" in c10_as_100)
    assert ("data.dataset=cifar10 asks for CIFAR-10" in c100_as_10 and "CIFAR-100 files" in c100_as_10
            and "set data.dataset=cifar100" in c100_as_10)
    assert "trained on CIFAR-100 (data.dataset=cifar100" in run_as_10 and "data.dataset=cifar10 asks" in run_as_10
    assert "a network with 100 outputs (CIFAR-100's classes)" in pth_as_10 and "pass data.dataset=cifar100" in pth_as_10
    assert "10 outputs (CIFAR-10)" in export and "this run is CIFAR-100" in export and "--format pt2" in export
    assert not os.path.exists(os.path.join(run100, "cifar_net.pth"))


def test_a_debug_run_on_cifar100_pickles_trains_and_evaluates(tmp_path, capsys, monkeypatch):
    """train.py and evaluate.py's code in this process (their command lines are tested elsewhere)."""
    names = [f"{c}_x" for c in CIFAR100_CLASSES]            # the meta file's names are the ones reported
    root = write_cifar100(str(tmp_path / "data"), n_train=200, n_test=100, classes=names)
    out = tmp_path / "run"
    train_here("--config", "configs/debug.yaml", "data.source=files", "data.dataset=cifar100", f"data.root={root}",
               "data.download=false", "train.epochs=1", f"output_dir={out}")
    summary = read_json(out / "summary.json")
    assert list(summary["per_class_acc"]) == names
    monkeypatch.setenv("WANDB_MODE", "disabled")
    capsys.readouterr()
    evaluate_run(str(out), [], "none", str(tmp_path / "eval"))
    stdout = capsys.readouterr().out
    evaluated = read_json(tmp_path / "eval" / "eval.json")
    assert evaluated["count"] == 100 and evaluated["dataset"] == "cifar100"
    assert list(evaluated["per_class"]) == names and np.asarray(evaluated["confusion"]).shape == (100, 100)
    assert "Accuracy of the network on the 100 test images" in stdout
    assert "The best 10 of 100 classes" in stdout and "The worst 10 of 100 classes" in stdout
    assert len([line for line in stdout.splitlines() if line.startswith("Accuracy of")]) == 21
    with Image.open(tmp_path / "eval" / "confusion.png") as png:
        assert png.size[0] >= 1500
    # resuming it as CIFAR-10 (synthetic, so that the data is there) is refused before any step
    line = refused_here(capsys, train_here, "--config", "configs/debug.yaml", "train.epochs=2", f"output_dir={out}")
    assert "was trained on data.dataset=cifar100, this run is data.dataset=cifar10" in line


def test_predict_names_a_cifar100_runs_classes(tmp_path, capsys):
    """Top-k over the run's 100 classes, named by its meta file, or by the built-in names where the data is not."""
    names = [f"kind_{i}" for i in range(100)]
    root = write_cifar100(str(tmp_path / "data"), n_train=5, n_test=5, classes=names)
    run100 = fake_run(str(tmp_path / "run"), ["data.dataset=cifar100", f"data.root={root}"],
                      build_model("tutorial_net", 100))
    image = tmp_path / "cat.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(image)
    capsys.readouterr()
    assert predict_images(run100, [str(image)], [], top_k=100, as_json=True) == 0
    top = json.loads(capsys.readouterr().out)["predictions"][0]["top"]
    assert sorted(t["class"] for t in top) == sorted(names)
    predict_images(run100, [str(image)], [f"data.root={tmp_path / 'elsewhere'}"], top_k=3, as_json=True)
    assert {t["class"] for t in json.loads(capsys.readouterr().out)["predictions"][0]["top"]} <= \
        set(CIFAR100_CLASSES)
    with pytest.raises(UserError, match="between 1 and 100"):
        predict_images(run100, [str(image)], [], top_k=101)

