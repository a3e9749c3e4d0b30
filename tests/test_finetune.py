"""Fine-tuning (model.init_from, model.freeze; cifar/finetune.py): weights only, the tensors that fit copied, the rest
(the head, CIFAR-10 -> CIFAR-100) left as the new network initialised them and listed in one line; the run's record
says what it started from; a frozen backbone stays bitwise the source's, BatchNorm statistics included; a resumed
run takes its checkpoint's weights, never the source's again; every path that holds no fitting weights is one line."""
from __future__ import annotations

import contextlib
import hashlib
import os
import shutil

import pytest
import torch
import yaml
from conftest import DEBUG, read_json, weights
from test_tracking import leet
from test_wandb_training import runs_in, wandb_env
from inprocess import as_a_process, call, refusal, train_here
from safetensors.torch import save_file

from cifar import finetune
from cifar.checkpoint import read_training
from bn_model import BnNet

from cifar.config import ModelConfig, load_config
from cifar.engine import start_run
from cifar.errors import UserError
from cifar.runtime import shut_down
from cifar.signals import StopRequest

# A CIFAR-10 run of tests/bn_model.py's BnNet (BatchNorm in the body, a Linear head), trained in a second
SMALL = ("--config", "configs/debug.yaml", "model.name=bn_model:BnNet", "data.limit_train=128", "data.limit_test=64",
         "train.epochs=1")
BN_HEAD = ("fc.weight", "fc.bias")


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def said(caplog, what: str = "model.init_from") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "cifar" and what in r.getMessage()]


@contextlib.contextmanager
def started(*args):
    """The engine's Run for train.py's arguments as training would begin it: the model at step 0."""
    with as_a_process():
        cfg = load_config(args[1], list(args[2:]))
        run = start_run(cfg, StopRequest())
        try:
            yield run
        finally:
            run.lock.release()
            shut_down(run.accelerator)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "run"
    train_here(*SMALL, f"output_dir={out}")
    return out


@pytest.mark.slow
def test_a_cifar10_debug_run_starts_a_cifar100_run(baseline, tmp_path, caplog):
    """The acceptance: the debug run (CIFAR-10) starts a CIFAR-100 debug run. At step 0 the body is the source's,
    bitwise; the head has 100 outputs, initialised as the same run without init_from initialises it; one line lists
    the head; summary.json and config.yaml say where the weights came from, with the file's SHA-256."""
    source = baseline(*DEBUG)
    file = source / "model.safetensors"
    args = ("--config", "configs/debug.yaml", "data.dataset=cifar100", "train.epochs=1")
    with started(*args, f"model.init_from={source}", f"output_dir={tmp_path}/zero") as run:
        at_zero = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    with started(*args, f"output_dir={tmp_path}/fresh") as run:
        fresh = {k: v.clone() for k, v in run.raw_model.state_dict().items()}
    trained = weights(source)
    body = [k for k in trained if not k.startswith("fc3.")]
    assert body and all(torch.equal(at_zero[k], trained[k]) for k in body)
    assert trained["fc3.weight"].shape == (10, 84) and at_zero["fc3.weight"].shape == (100, 84)
    assert all(torch.equal(at_zero[k], fresh[k]) for k in ("fc3.weight", "fc3.bias"))

    caplog.clear()
    with caplog.at_level("INFO", logger="cifar"):
        train_here(*args, f"model.init_from={source}", f"output_dir={tmp_path}/ft")
    digest = sha256(file)
    assert said(caplog) == [f"model.init_from: 8 of 10 tensors from {file} (sha256 {digest[:12]}); re-initialised, "
                            f"shape differs: fc3.bias [10] -> [100], fc3.weight [10, 84] -> [100, 84]"]
    summary = read_json(tmp_path / "ft" / "summary.json")
    assert summary["init_from"] == {"path": str(file), "sha256": digest, "loaded": 8,
                                    "reinitialised": ["fc3.bias", "fc3.weight"], "missing": [], "unexpected": []}
    assert summary["steps"] == 64 and summary["resumed_from"] is None       # step 0, a schedule of its own
    config = yaml.safe_load(open(tmp_path / "ft" / "config.yaml"))
    assert config["model"]["init_from"] == str(source) and config["data"]["dataset"] == "cifar100"


@pytest.mark.slow
def test_the_wandb_run_config_says_what_the_run_started_from(source, tmp_path):
    """W&B (offline, read back with its own reader): the run's config holds model.init_from as given and, under
    run.init_from, summary.json's record with the file's SHA-256."""
    out = tmp_path / "wb"
    call("train.py", *SMALL, f"model.init_from={source}", "train.max_steps=1", f"output_dir={out}",
         **wandb_env(tmp_path))
    (run_dir,) = runs_in(out)
    config = leet(run_dir, summary=True)["config"]
    record = read_json(out / "summary.json")["init_from"]
    assert config["run"]["init_from"] == record and record["sha256"] == sha256(source / "model.safetensors")
    assert config["model"]["init_from"] == str(source)


def test_a_frozen_backbone_stays_the_sources_bitwise(source, tmp_path):
    """model.freeze=backbone: after training, every tensor but the head's is the source's, BatchNorm's running
    statistics too (the backbone's BatchNorm is kept in eval mode); the head trained; the optimizer holds only the
    head's two parameters."""
    out = tmp_path / "frozen"
    train_here(*SMALL, f"model.init_from={source}", "model.freeze=backbone", "optim.lr=0.1",
               "checkpoint.every_steps=2", f"output_dir={out}")
    before, after = weights(source), weights(out)
    body = [k for k in before if k not in BN_HEAD]
    assert {"bn.running_mean", "bn.running_var", "bn.num_batches_tracked"} <= set(body)
    assert [k for k in body if not torch.equal(before[k], after[k])] == []
    assert not any(torch.equal(before[k], after[k]) for k in BN_HEAD)
    checkpoint = max((out / "checkpoints").glob("step-*"))
    groups = read_training(str(checkpoint))["optimizer"]["param_groups"]
    assert sum(len(g["params"]) for g in groups) == 2


def test_without_freezing_everything_trains_from_the_source(source, tmp_path, caplog):
    """Same dataset, same network: every tensor fits, none is listed, and training moves the body too."""
    with caplog.at_level("INFO", logger="cifar"):
        train_here(*SMALL, f"model.init_from={source}", "optim.lr=0.1", f"output_dir={tmp_path}/all")
    (line,) = said(caplog)
    assert line.startswith(f"model.init_from: 9 of 9 tensors from {source}/model.safetensors (sha256 ")
    assert ";" not in line                                  # nothing re-initialised, missing or ignored
    before, after = weights(source), weights(tmp_path / "all")
    assert not torch.equal(before["conv.weight"], after["conv.weight"])


def test_a_tutorial_pth_and_a_checkpoint_folder_start_a_run(source, tmp_path, caplog):
    """A bare state_dict (torch.save(net.state_dict(), PATH), the tutorial's cifar_net.pth) and a checkpoint folder
    are read as evaluate.py reads them; keys the file lacks or the model lacks are listed in the same line."""
    state = weights(source)
    del state["fc.bias"]
    state["extra.weight"] = torch.zeros(3)
    pth = tmp_path / "cifar_net.pth"
    torch.save(state, pth)
    with caplog.at_level("INFO", logger="cifar"):
        train_here(*SMALL, f"model.init_from={pth}", "train.max_steps=1", f"output_dir={tmp_path}/pth")
    assert said(caplog) == [f"model.init_from: 8 of 9 tensors from {pth} (sha256 {sha256(pth)[:12]}); not in the "
                            f"file, initialised: fc.bias; in the file but not in the model, ignored: extra.weight"]
    record = read_json(tmp_path / "pth" / "summary.json")["init_from"]
    assert (record["missing"], record["unexpected"], record["loaded"]) == (["fc.bias"], ["extra.weight"], 8)
    (checkpoint,) = (source / "checkpoints").glob("step-*")
    train_here(*SMALL, f"model.init_from={checkpoint}", "train.max_steps=1", f"output_dir={tmp_path}/ckpt")
    assert read_json(tmp_path / "ckpt" / "summary.json")["init_from"]["path"] == str(checkpoint / "model.safetensors")


def test_a_resumed_run_takes_its_checkpoint_not_the_source_again(source, tmp_path, caplog, capsys):
    """Resume wins: the rerun continues from its checkpoint even with the source gone (init_from is not read
    again, no line says it is), and its record still says what the run started from."""
    src = tmp_path / "src"
    shutil.copytree(source, src)
    args = (*SMALL, f"model.init_from={src}", "checkpoint.every_steps=2", f"output_dir={tmp_path}/run")
    train_here(*args, "train.max_steps=2")
    first = read_json(tmp_path / "run" / "summary.json")["init_from"]
    shutil.rmtree(src)
    caplog.clear()
    with caplog.at_level("INFO", logger="cifar"):
        train_here(*args, "train.max_steps=4")
    summary = read_json(tmp_path / "run" / "summary.json")
    assert summary["resumed_from"] and summary["steps"] == 4 and said(caplog) == []
    assert summary["init_from"] == first and first["sha256"] == sha256(source / "model.safetensors")
    # what the steps so far started from cannot change: another source, or freezing now, is refused like any
    # other model key
    for change in (f"model.init_from={source}", "model.freeze=backbone"):
        line = refusal(capsys, "train.py", *args, "train.max_steps=6", change)
        assert line.startswith("error: cannot resume ") and change.split("=")[0] in line, line


def test_what_holds_no_fitting_weights_is_one_line(source, tmp_path, capsys):
    train = ("train.py", *SMALL)
    missing = refusal(capsys, *train, f"model.init_from={tmp_path}/nowhere", f"output_dir={tmp_path}/o1")
    assert missing == (f"error: model.init_from={tmp_path}/nowhere does not exist; pass a run folder, a checkpoint "
                       f"folder, a .safetensors or a .pth/.pt file of weights")
    (tmp_path / "notes.txt").write_text("hello")
    assert "is not a weights file (.safetensors, .pth or .pt)" in refusal(
        capsys, *train, f"model.init_from={tmp_path}/notes.txt", f"output_dir={tmp_path}/o2")
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header")
    assert "cannot be read as weights" in refusal(
        capsys, *train, f"model.init_from={tmp_path}/broken.safetensors", f"output_dir={tmp_path}/o3")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no weights at" in refusal(capsys, *train, f"model.init_from={empty}", f"output_dir={tmp_path}/o4")
    # nothing fits: the tutorial's Net into BnNet; the source run's model named as the fix
    net = tmp_path / "net.safetensors"
    save_file({"conv1.weight": torch.zeros(6, 3, 5, 5), "fc3.weight": torch.zeros(10, 84)}, str(net))
    assert refusal(capsys, *train, f"model.init_from={net}", f"output_dir={tmp_path}/o5") == (
        f"error: model.init_from: no tensor of {net} fits model bn_model:BnNet (its 2 tensors, first: conv1.weight is "
        f"not a layer of it); pass weights of the same network")
    line = refusal(capsys, "train.py", *SMALL, "model.name=tutorial_net", f"model.init_from={source}",
                   f"output_dir={tmp_path}/o6")
    assert line.startswith(f"error: model.init_from: no tensor of {source}/model.safetensors fits model tutorial_net")
    assert line.endswith("; pass model.name=bn_model:BnNet as the run that saved them, or weights of the same network")


def test_a_pth_that_would_run_code_is_refused_unread(tmp_path, capsys):
    """A hostile .pth (its pickle calls a function on load) goes through the weights-only reader: refused, and
    the function never runs."""
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "cifar_net.pth"
    torch.save({"conv.weight": Payload()}, evil)
    line = refusal(capsys, "train.py", *SMALL, f"model.init_from={evil}", f"output_dir={tmp_path}/o")
    assert line.startswith(f"error: {evil} needs arbitrary unpickling to load (it holds a posix.system"), line
    assert not marker.exists()


def test_an_oversized_file_is_refused_before_it_is_read(source, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(finetune, "MAX_BYTES", 1000)
    line = refusal(capsys, "train.py", *SMALL, f"model.init_from={source}", f"output_dir={tmp_path}/o")
    assert "larger than any CIFAR network's weights" in line


def test_freezing_needs_a_head_and_no_expiring_parameter(tmp_path, capsys):
    line = refusal(capsys, "train.py", *SMALL, "model.name=bn_model:Pooled", "model.freeze=backbone",
                   f"output_dir={tmp_path}/o")
    assert line == ("error: model.freeze=backbone trains only the head, the network's last nn.Linear, and model "
                    "bn_model:Pooled has none; set model.freeze=none")
    with pytest.raises(UserError, match="model.whiten_bias_epochs"):
        load_config("configs/fast94.yaml", ["model.freeze=backbone"])
    with pytest.raises(UserError, match="model.freeze"):
        load_config(None, ["model.freeze=all"])
    assert load_config(None, ["model.freeze=backbone"]).model.freeze == "backbone"


def test_a_long_list_is_cut_to_eight_names_and_a_count(tmp_path, caplog):
    """The line stays a line: eight names of a kind, then how many more; the record keeps them all."""
    state = {**BnNet().state_dict(), **{f"extra{i}.weight": torch.zeros(1) for i in range(10)}}
    file = str(tmp_path / "w.safetensors")
    save_file(state, file)
    with caplog.at_level("INFO", logger="cifar"):
        record = finetune.init_from(BnNet(), ModelConfig(name="bn_model:BnNet", init_from=file))
    (line,) = said(caplog)
    listed = ", ".join(f"extra{i}.weight" for i in range(8))
    assert line.endswith(f"; in the file but not in the model, ignored: {listed} and 2 more"), line
    assert record["unexpected"] == [f"extra{i}.weight" for i in range(10)] and record["loaded"] == 9
