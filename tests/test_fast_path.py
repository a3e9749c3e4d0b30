"""The fast path: device-resident data, FastNet + Muon, TTA, timing; on CPU with tiny synthetic subsets."""
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, max_diff, read_json, read_jsonl, run, weights
from inprocess import train_here
from dump_device_batches import batches_of

from cifar.config import DataConfig, OptimConfig, ScheduleConfig
from cifar.data import DeviceBatches, crop_flip, synthetic_split
from cifar.evaluate_cli import evaluate_run
from cifar.runtime import compile_mode
from cifar.evaluation import predict
from cifar.models import FastNet
from cifar.optim import Muon, build_optimizer, orthogonalize
from cifar.schedule import build_scheduler

TINY_FAST = ["--config", "configs/fast94.yaml", "data.source=synthetic", "data.limit_train=512",
             "data.limit_test=128", "data.batch_size=64", "data.eval_batch_size=64", "train.epochs=2",
             "train.mixed_precision=no", "train.compile=false", "train.eval_every_epochs=1"]
# The fewest images that still give the whitening-bias freeze an epoch before and after it: 128 images in global
# batches of 32 (4 steps an epoch); 64 test images, evaluated once at the end without TTA (no weight depends on it)
SMALL_FAST = [*TINY_FAST, "data.limit_train=128", "data.limit_test=64", "data.batch_size=32", "train.tta=none",
              "train.eval_every_epochs=3"]


@pytest.fixture
def no_wandb(monkeypatch):
    """evaluate.py's code in this process, with W&B off as run() has it."""
    monkeypatch.setenv("WANDB_MODE", "disabled")


def two_ranks(tmp_path, *overrides):
    """Each rank's training batches in a 2-process run (tests/dump_device_batches.py under accelerate launch)."""
    run("tests/dump_device_batches.py", str(tmp_path), *overrides, procs=2)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


def fingerprint(images, labels):
    """One comparable row per sample: its label and its (augmented) pixels."""
    return sorted(map(tuple, torch.cat([labels[:, None].float(), images.flatten(1)], 1).tolist()))


@pytest.mark.slow
def test_device_batches_are_the_same_set_per_global_step_for_1_and_2_processes(tmp_path):
    one = batches_of(["data.limit_train=96", "data.batch_size=16"])          # one process: this one
    two = two_ranks(tmp_path, "data.limit_train=96", "data.batch_size=8")
    for epoch in (0, 3):
        assert len(one[epoch]) == len(two[0][epoch]) == len(two[1][epoch]) == 6
        for k, (x, y) in enumerate(one[epoch]):
            (x0, y0), (x1, y1) = two[0][epoch][k], two[1][epoch][k]
            assert fingerprint(x, y) == fingerprint(torch.cat([x0, x1]), torch.cat([y0, y1]))
            assert fingerprint(x0, y0) != fingerprint(x1, y1)          # each rank gets its own half
    assert not torch.equal(one[0][0][1], one[3][0][1])                  # a new order every epoch


def test_device_augmentation_is_a_function_of_seed_epoch_index():
    split = synthetic_split(50, True)
    acc = Accelerator(cpu=True)
    a = DeviceBatches(acc, split, DataConfig(augment=True, batch_size=10), True, seed=5)
    b = DeviceBatches(acc, split, DataConfig(augment=True, batch_size=25), True, seed=5)
    for epoch in (0, 1, 7):
        assert all(torch.equal(p, q) for p, q in zip(a.augmentation(epoch), b.augmentation(epoch)))
    assert not torch.equal(a.augmentation(0)[0], a.augmentation(1)[0])
    alt = DeviceBatches(acc, split, DataConfig(augment=True, alternating_flip=True), True, seed=5)
    f0, f1, f2 = (alt.augmentation(e)[2] for e in (0, 1, 2))
    assert torch.equal(f0, ~f1) and torch.equal(f0, f2)                 # alternating flip


@pytest.mark.parametrize("pad_mode", ["zeros", "reflect"])
def test_crop_flip_matches_a_per_image_reference(pad_mode):
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 4, 8, 2, 3, 8]), torch.tensor([8, 0, 4, 2, 7, 1])
    flip = torch.tensor([True, False, True, False, True, False])
    out = crop_flip(images, dy, dx, flip, pad=4, pad_mode=pad_mode)
    for i in range(6):
        padded = np.pad(images[i].numpy(), ((0, 0), (4, 4), (4, 4)),
                        mode="reflect" if pad_mode == "reflect" else "constant")
        ref = padded[:, dy[i]:dy[i] + 32, dx[i]:dx[i] + 32]
        ref = ref[:, :, ::-1] if flip[i] else ref
        assert np.array_equal(out[i].numpy(), ref)
    border = out[1, :, :, :4]                          # image 1 is shifted 4 px right: its left border is padding
    if pad_mode == "reflect":
        assert torch.equal(border, images[1, :, :, 1:5].flip(-1))
    else:
        assert not border.any()


@pytest.mark.slow
def test_fast_recipe_on_a_small_subset_with_checkpoints_and_metrics(tmp_path, no_wandb):
    # 256 images in batches of 32: 8 steps an epoch, 16 in all
    out = tmp_path / "fast"
    train_here(*TINY_FAST, "data.limit_train=256", "data.batch_size=32", "checkpoint.every_steps=4",
               "checkpoint.keep_last=2", "train.target_acc=20", f"output_dir={out}")
    summary = read_json(out / "summary.json")
    assert summary["tta"] == "flip_translate" and summary["steps"] == 16
    for key in ("train_seconds", "data_seconds", "compile_seconds", "flops_per_image", "time_to_target"):
        assert summary[key] is not None, key
    assert 0 < summary["eval_seconds"] < summary["wall_seconds"] - summary["train_seconds"]
    assert summary["steps_to_target"] in (8, 16) and summary["time_to_target"] <= summary["train_seconds"]
    assert 0.65e9 < summary["flops_per_image"] < 0.75e9          # 0.708 GFLOP fwd+bwd per image, as airbench94
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["epoch"] for r in rows if "test/acc" in r] == [0, 1]
    assert all("data_wait" in r for r in rows if "epoch_time" in r)
    assert sorted(p.name for p in (out / "checkpoints").iterdir() if p.name.startswith("step-")) == \
        ["step-12", "step-16"]
    # evaluate.py --tta flip_translate's code, in this process
    report = evaluate_run(str(out), [], "flip_translate", str(tmp_path / "e"))
    assert read_json(tmp_path / "e" / "eval.json")["accuracy"] == pytest.approx(summary["final_test_acc"])
    assert report["accuracy"] == pytest.approx(summary["final_test_acc"])


@pytest.mark.slow
@pytest.mark.budget(seconds=300, reason="torch.compile (inductor) builds C++ kernels for FastNet's training graphs "
                    "before and after the whitening-bias freeze and for both evaluation graphs: over a minute with "
                    "inductor's cache in /tmp warm, minutes cold, whatever the data size (training and evaluating "
                    "take seconds here)")
def test_fast_recipe_compiled_on_cpu(tmp_path, no_wandb):
    out = tmp_path / "compiled"
    # the whitening bias freezes after epoch 0: a second training graph, which the warm-up must compile too
    # and it evaluates after both epochs, with the recipe's TTA: an evaluation graph on each side of the freeze
    run("train.py", *SMALL_FAST, "data.batch_size=64", "train.compile=true", "model.whiten_bias_epochs=1",
        "train.tta=flip_translate", "train.eval_every_epochs=1", f"output_dir={out}", timeout=600)
    summary = read_json(out / "summary.json")
    assert summary["compile_seconds"] > 0 and summary["steps"] == 4
    assert summary["graphs_compiled_in_training"] == 0
    assert summary["compile_mode"] == "reduce-overhead"               # the recipe's (graphs are CUDA-only)
    assert not any(k.startswith("_orig_mod") for k in weights(out))   # weights load into a plain model
    # evaluate.py's code, in this process: the plain model scores what the compiled run measured
    report = evaluate_run(str(out), [], "flip_translate", str(tmp_path / "e"))
    assert report["count"] == 64 and report["accuracy"] == pytest.approx(summary["final_test_acc"])
    assert report["loss"] == pytest.approx(summary["final_test_loss"], rel=1e-4)


def test_several_processes_compile_without_cuda_graphs():
    assert compile_mode("reduce-overhead", 1) == "reduce-overhead"
    assert compile_mode("reduce-overhead", 2) == "default"
    assert compile_mode("max-autotune", 8) == "max-autotune-no-cudagraphs"
    assert compile_mode("max-autotune-no-cudagraphs", 2) == "max-autotune-no-cudagraphs"
    assert compile_mode("default", 2) == "default"


def test_whitening_filters_whiten_patches():
    images = torch.from_numpy(synthetic_split(200, True).images).float() / 255
    net = FastNet()
    net.init_from_data(images)
    out = net.whiten(images)[:, :12]                             # the + half of the filters
    flat = out.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    assert torch.allclose(cov.diag(), torch.ones(12), atol=0.05)  # unit variance along every eigen-direction
    assert cov.fill_diagonal_(0).abs().max() < 0.05               # and decorrelated
    assert not net.whiten.weight.requires_grad


def test_expiring_parameter_has_its_own_group_whose_lr_reaches_zero_at_its_step():
    net = FastNet()
    bias = net.whiten.bias
    opt = build_optimizer(OptimConfig(name="muon", lr=0.2, bias_lr=8.0, head_lr=1.0, weight_decay=0.04), net,
                          {bias: 4})
    alone = opt.param_groups[-1]
    assert len(alone["params"]) == 1 and alone["params"][0] is bias and alone["until_step"] == 4
    assert (alone["lr"], alone["weight_decay"]) == (8.0, 0.04 / 8.0)          # the biases' hyperparameters
    assert all(p is not bias for g in opt.param_groups[:-1] for p in g["params"])
    assert opt.param_groups[0]["muon"]                                        # group 0 (the logged lr) unchanged
    scheduler = build_scheduler(ScheduleConfig(name="linear"), opt, total_steps=9)
    lrs = []
    for _ in range(9):
        lrs.append((opt.param_groups[0]["lr"], alone["lr"]))
        opt.step()
        scheduler.step()
    assert [b for _, b in lrs] == [8.0, 6.0, 4.0, 2.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert [a for a, _ in lrs] == pytest.approx([0.2 * (1 - s / 8) for s in range(9)])


def checkpointed(out, step, name):
    return weights(out / "checkpoints" / f"step-{step}")[name]


@pytest.mark.slow
def test_whiten_bias_trains_for_its_epochs_then_stays_frozen_under_ddp(tmp_path):
    # 128 images, 2 processes x 16: 4 steps an epoch, the bias trains for the first 4
    out = tmp_path / "ddp"
    run("train.py", *SMALL_FAST, "data.batch_size=16", "train.epochs=3", "model.whiten_bias_epochs=1",
        "checkpoint.every_steps=2", "checkpoint.keep_last=6", f"output_dir={out}", procs=2)
    bias = {step: checkpointed(out, step, "whiten.bias") for step in (2, 4, 6, 12)}
    assert not torch.equal(bias[2], bias[4])                                  # trained in epoch 0
    assert torch.equal(bias[4], bias[6]) and torch.equal(bias[4], bias[12])   # then frozen
    assert not torch.equal(checkpointed(out, 4, "head.weight"), checkpointed(out, 12, "head.weight"))


def test_resume_at_the_freeze_gives_the_uninterrupted_weights(tmp_path):
    common = [*SMALL_FAST, "train.epochs=3", "model.whiten_bias_epochs=1", "checkpoint.every_epochs=1",
              "checkpoint.keep_last=3"]
    train_here(*common, f"output_dir={tmp_path}/full")
    # from the end of epoch 0: the resumed run must freeze the bias itself and keep the bias group's schedule
    train_here(*common, f"checkpoint.resume={tmp_path}/full/checkpoints/step-4", f"output_dir={tmp_path}/re")
    assert max_diff(weights(tmp_path / "full"), weights(tmp_path / "re")) == 0
    assert torch.equal(weights(tmp_path / "full")["whiten.bias"], checkpointed(tmp_path / "full", 4, "whiten.bias"))


def test_resume_with_other_parameter_groups_is_one_clear_line(tmp_path, capsys):
    train_here(*SMALL_FAST, "train.epochs=1", f"output_dir={tmp_path}")
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        train_here(*SMALL_FAST, "model.whiten_bias_epochs=null", f"output_dir={tmp_path}")
    stderr = capsys.readouterr().err
    # refused before anything is loaded (cifar/resume.py), naming the key that makes the other parameter groups:
    # exit 2 and exactly one line on stderr
    assert exit_.value.code == 2 and "Traceback" not in stderr and len(stderr.strip().splitlines()) == 1
    assert stderr.endswith("\n") and stderr.count("\n") == 1
    assert "model.whiten_bias_epochs: 3 -> null" in stderr and "resume with model.whiten_bias_epochs=3" in stderr


def test_orthogonalize_and_muon_step():
    g = torch.randn(64, 27)
    s = torch.linalg.svdvals(orthogonalize(g))
    assert s.min() > 0.5 and s.max() < 1.5                        # singular values pushed towards 1
    conv = torch.nn.Conv2d(3, 8, 3, bias=False)
    opt = Muon([dict(params=[conv.weight], muon=True)], lr=0.1, momentum=0.6)
    conv(torch.randn(4, 3, 8, 8)).square().mean().backward()
    opt.step()
    assert float(conv.weight.detach().norm()) == pytest.approx(8 ** 0.5, rel=0.2)   # filters kept near a fixed norm


def test_tta_views():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 10, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(2, 3, 32, 32)
    plain, flip, both = (predict(net, x, t) for t in ("none", "flip", "flip_translate"))
    assert torch.allclose(flip, (net(x) + net(x.flip(-1))) / 2)
    assert both.shape == plain.shape and not torch.allclose(both, flip)


# Page faults of allocating and freeing a 64 MB tensor (one activation of a large batch) five times over, after
# 15 times to settle in (the heap grows until such a block fits a hole, as torch asks for them aligned: up to 7
# times here).
# The engine applies it through make_accelerator, as train.keep_freed_memory says.
FAULTS = """
import resource, sys, torch
from cifar.config import load_config
from cifar.runtime import make_accelerator
make_accelerator(load_config("configs/debug.yaml", [f"train.keep_freed_memory={sys.argv[1]}"]))
for _ in range(15):
    torch.ones(2**24)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    torch.ones(2**24)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_cpu_memory_is_reused_without_page_faults():
    def faults(mode):
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], cwd=ROOT, capture_output=True, text=True,
                             check=True)
        return int(out.stdout)
    pages = 5 * 2**26 // 4096
    assert faults("false") > 0.9 * pages          # glibc maps each big block afresh, so every page faults again
    assert faults("true") < 0.05 * pages
