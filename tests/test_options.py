"""Three small training options: optim.decay_norm_bias (no weight decay on norm and bias parameters when false; the
default leaves every recipe's optimizer, and so its results, as they were), train.deterministic (torch's
deterministic algorithms; cuDNN's benchmark off on a GPU) and train.profile (a torch.profiler trace of N steps in the
run folder, from the main process only)."""
from __future__ import annotations

import glob
import json
import os

import pytest
import torch
from bn_model import BnNet
from conftest import ROOT, max_diff, run, weights
from inprocess import train_here

from cifar.config import load_config
from cifar.models import build_model
from cifar.optim import OPTIMIZERS, build_optimizer
from cifar.resume import config_diff

TINY = ("--config", "configs/debug.yaml", "model.name=bn_model:BnNet", "data.limit_train=128", "data.limit_test=64",
        "train.epochs=1")
RECIPES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def trace_steps(run_dir) -> list[str]:
    with open(os.path.join(run_dir, "profile", "rank0.pt.trace.json")) as f:
        events = json.load(f)["traceEvents"]
    assert any(e.get("name", "").startswith("aten::") for e in events)       # the ops themselves
    return sorted({e["name"] for e in events if e.get("name", "").startswith("ProfilerStep#")})


@pytest.mark.parametrize("recipe", RECIPES, ids=os.path.basename)
def test_the_default_builds_every_recipes_optimizer_as_before(recipe):
    """decay_norm_bias defaults to true, and then the optimizer is the one built before the key existed (one
    group of every trainable parameter, handed to the recipe's optimizer): same groups, same hyperparameters."""
    cfg = load_config(recipe)
    assert cfg.optim.decay_norm_bias is True
    net = build_model(cfg.model.name, 10) if cfg.model.name == "tutorial_net" else BnNet()
    before = OPTIMIZERS[cfg.optim.name]([dict(params=[p for p in net.parameters() if p.requires_grad])], cfg.optim)
    assert build_optimizer(cfg.optim, net).state_dict()["param_groups"] == before.state_dict()["param_groups"]


@pytest.mark.parametrize("name", ["sgd", "adamw", "muon"])
def test_false_exempts_norm_and_bias_parameters_from_weight_decay(name):
    """One real step with zero gradients is weight decay alone: with decay_norm_bias=false the biases and the
    BatchNorm's scale and shift stay, the other weights shrink; with the default every parameter shrinks."""
    for exempt in (False, True):
        torch.manual_seed(0)
        net = BnNet()
        with torch.no_grad():
            for p in net.parameters():
                p.add_(1.0)                                 # no zero that decay could not move
        cfg = load_config(None, [f"optim.name={name}", "optim.lr=0.1", "optim.weight_decay=0.5",
                                 f"optim.decay_norm_bias={str(not exempt).lower()}"])
        before = {k: v.clone() for k, v in net.named_parameters()}
        optimizer = build_optimizer(cfg.optim, net)
        for p in net.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()
        moved = {k for k, p in net.named_parameters() if not torch.equal(p, before[k])}
        quiet = {"conv.bias", "bn.weight", "bn.bias", "fc.bias"}
        assert moved.isdisjoint(quiet) if exempt else quiet <= moved, (name, exempt, moved)
        assert "fc.weight" in moved


def test_checkpoints_from_before_the_keys_resume_unchanged():
    """A saved config without model.freeze, optim.decay_norm_bias, train.deterministic (or model.init_from,
    train.profile) reads as what it trained with: no change for resume to refuse."""
    saved = load_config("configs/debug.yaml").to_dict()
    for section, key in (("model", "freeze"), ("model", "init_from"), ("optim", "decay_norm_bias"),
                         ("train", "deterministic"), ("train", "profile")):
        del saved[section][key]
    assert config_diff(saved, load_config("configs/debug.yaml").to_dict()) == {}
    changed = load_config("configs/debug.yaml", ["train.profile=2", "train.deterministic=true"]).to_dict()
    assert list(config_diff(saved, changed)) == ["train.deterministic"]    # applied on resume; profile is free


def test_deterministic_is_set_either_way_and_trains_the_same_on_cpu(tmp_path):
    """On the CPU, torch's deterministic algorithms train the very same weights (its kernels here are
    deterministic already); the flag follows each run's config, also in a process that ran another before."""
    try:
        train_here(*TINY, "train.deterministic=true", f"output_dir={tmp_path}/on")
        assert torch.are_deterministic_algorithms_enabled() and torch.is_deterministic_algorithms_warn_only_enabled()
        train_here(*TINY, f"output_dir={tmp_path}/off")
        assert not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert max_diff(weights(tmp_path / "on"), weights(tmp_path / "off")) == 0


def test_profile_traces_the_steps_asked_for_into_the_run_folder(tmp_path):
    """train.profile=2: the steps after the warm-up step, 2 of them, as a Chrome/Perfetto trace; a run that ends
    first writes what it traced; without the key, no profile folder."""
    train_here(*TINY, "train.profile=2", f"output_dir={tmp_path}/two")
    assert trace_steps(tmp_path / "two") == ["ProfilerStep#1", "ProfilerStep#2"]
    train_here(*TINY, "train.profile=5", "train.max_steps=2", f"output_dir={tmp_path}/short")
    assert trace_steps(tmp_path / "short") == ["ProfilerStep#1"]
    train_here(*TINY, "train.max_steps=1", f"output_dir={tmp_path}/none")
    assert not (tmp_path / "none" / "profile").exists()


@pytest.mark.slow
def test_profile_under_two_processes_is_the_main_processes_only(tmp_path):
    """Two DDP ranks: one trace, rank 0's; rank 1 profiles nothing (the files are its own otherwise, same name)."""
    run("train.py", "--config", "configs/debug.yaml", "data.limit_train=128", "data.limit_test=64", "train.epochs=1",
        "train.profile=1", "data.batch_size=16", f"output_dir={tmp_path}/ddp", procs=2)
    assert os.listdir(tmp_path / "ddp" / "profile") == ["rank0.pt.trace.json"]
    assert trace_steps(tmp_path / "ddp") == ["ProfilerStep#1"]
