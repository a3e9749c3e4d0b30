"""The distributed and accumulation claims: the same data and the same update, whatever the layout."""
import subprocess

import pytest
import torch
from concurrent.futures import ThreadPoolExecutor

from conftest import (DOUBLE_BATCH, ROOT, command, double_batch_pair, env, max_diff, read_json, read_jsonl, run,
                      weights)
from inprocess import train_here
from dump_device_batches import batches_of

from cifar.evaluate_cli import evaluate_run

COMMON = ["--config", "configs/tutorial.yaml", "data.augment=true", "data.num_workers=0", "optim.lr=0.05",
          "train.epochs=2", "train.log_every_steps=1"]


@pytest.fixture
def pair(baseline):
    """The session's 1-process run with batch 12 and 2-process run with batch 6 (conftest.DOUBLE_BATCH)."""
    return double_batch_pair(baseline)


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(pair):
    # 84 images, global batch 12: 7 steps per epoch, evenly split between the two ranks.
    one, two = pair
    assert read_json(two / "summary.json")["world_size"] == 2
    assert max_diff(weights(one), weights(two)) <= 1e-5
    # the logged losses are global means, so they agree too
    l1 = [r["train/loss"] for r in read_jsonl(one / "metrics.jsonl") if "train/loss" in r]
    l2 = [r["train/loss"] for r in read_jsonl(two / "metrics.jsonl") if "train/loss" in r]
    assert l1 == pytest.approx(l2, abs=1e-5)
    # and only the main process wrote the run folder's log (one row per step, not two)
    assert len(l2) == 14
    # other ranks are silent: the config and the summary are printed once
    stdout = (two.parent / f"{two.name}.stdout").read_text()
    assert stdout.count("run folder:") == 1 and stdout.count("final_test_acc") == 1


def test_accumulation_matches_double_batch_with_partial_last_window(tmp_path, cifar_root):
    # 84 images, micro-batch 8: 11 micro-batches per epoch (the last holds 4), windows of 2 -> the last window is
    # one short micro-batch. Batch 16: 6 steps, the last of 4 images. Same samples per step, same weights.
    train_here(*COMMON, f"data.root={cifar_root}", "data.batch_size=16", f"output_dir={tmp_path}/big")
    train_here(*COMMON, f"data.root={cifar_root}", "data.batch_size=8", "train.grad_accum_steps=2",
               f"output_dir={tmp_path}/acc")
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "acc")) <= 1e-5
    steps = [r["step"] for r in read_jsonl(tmp_path / "acc" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))


def test_accumulation_on_the_device_path_matches_the_whole_batch(tmp_path):
    """The fast recipe's loader (DeviceBatches, data.loader=device) under train.grad_accum_steps: 84 images as 10
    micro-batches of 8 (the last 4 images dropped) in 5 windows of 2, against 5 batches of 16 (the same 4 dropped).
    Window k holds exactly the images of batch k, augmented alike, so the weights (fp32, within 1e-5) and the logged
    losses agree.

    Checked that it fails: in a scratch copy, train_step dividing each micro-batch's loss by its own size instead
    of the window's made the weights differ by 0.1."""
    args = [*COMMON, "data.source=synthetic", "data.limit_train=84", "data.limit_test=32", "data.loader=device"]
    train_here(*args, "data.batch_size=16", f"output_dir={tmp_path}/big")
    train_here(*args, "data.batch_size=8", "train.grad_accum_steps=2", f"output_dir={tmp_path}/acc")
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "acc")) <= 1e-5
    assert losses(tmp_path / "big") == pytest.approx(losses(tmp_path / "acc"), abs=1e-5)
    assert len(losses(tmp_path / "acc")) == 10                # 2 epochs of 84 // 16 = 5 windows of 2 x 8 images


@pytest.mark.slow
def test_eval_counts_every_image_once_under_two_processes(pair, tmp_path, monkeypatch):
    _, trained = pair                                  # trained by 2 processes, itself evaluated there
    monkeypatch.setenv("WANDB_MODE", "disabled")
    # 37 test images with per-process batch 5: uneven across ranks and within the last batch
    evaluate_run(str(trained), ["data.eval_batch_size=5"], "none", str(tmp_path / "e1"))
    run("evaluate.py", "--checkpoint", str(trained), "--output", str(tmp_path / "e2"), "data.eval_batch_size=5",
        procs=2)
    e1 = read_json(tmp_path / "e1" / "eval.json")
    e2 = read_json(tmp_path / "e2" / "eval.json")
    assert e2["world_size"] == 2 and e1["world_size"] == 1
    assert e1["count"] == e2["count"] == 37
    assert sum(map(sum, e2["confusion"])) == 37
    assert e1["confusion"] == e2["confusion"]
    assert e1["accuracy"] == pytest.approx(e2["accuracy"])
    assert e1["loss"] == pytest.approx(e2["loss"], rel=1e-6)
    # the 2-process training run's own final evaluation (batches of 256, in the run's processes) agrees as well
    summary = read_json(trained / "summary.json")
    assert summary["world_size"] == 2
    assert summary["final_test_acc"] == pytest.approx(e1["accuracy"])
    assert summary["final_test_loss"] == pytest.approx(e1["loss"], rel=1e-6)
    assert summary["per_class_acc"] == pytest.approx(e1["per_class"])
    assert (tmp_path / "e2" / "confusion.png").is_file()


def run_both(one: list, two: list, script: str = "train.py", **two_env):
    """A 1-process train.py run and a 2-process run of `script` started together (3 processes on the 2 cores CI
    has: ~20% less wall time than one after the other)."""
    reference = subprocess.Popen(command("train.py", one), cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    run(script, *two, procs=2, **two_env)
    _, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err[-3000:]


def fingerprint(images, labels):
    """One comparable row per sample, its label and its (augmented) pixels, sorted: a batch as a multiset."""
    return sorted(map(tuple, torch.cat([labels[:, None].float(), images.flatten(1)], 1).tolist()))


def losses(folder) -> list[float]:
    return [r["train/loss"] for r in read_jsonl(folder / "metrics.jsonl") if "train/loss" in r]


@pytest.mark.slow
def test_device_path_drops_the_uneven_last_global_batch_as_one_process_with_double_batch_does(tmp_path, cifar_root):
    """84 images, global batch 16 (1 process x 16, or 2 x 8) on the device path: 5 full global batches an epoch,
    the last 4 images dropped alike, so the weights agree (fp32, within 1e-5) and so do the logged global losses.

    Checked that it fails: in a scratch copy, DeviceBatches slicing global batch k at k * batch_size instead of
    k * batch_size * processes (consecutive global batches overlapping under 2 processes) made the weights differ
    by 0.07."""
    args = [*COMMON, f"data.root={cifar_root}", "data.loader=device"]
    run_both([*args, "data.batch_size=16", f"output_dir={tmp_path}/one"],
             [*args, "data.batch_size=8", f"output_dir={tmp_path}/two"])
    assert read_json(tmp_path / "two" / "summary.json")["world_size"] == 2
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(one) == len(two) == 10                   # 2 epochs of 84 // 16 = 5 steps
    assert one == pytest.approx(two, abs=1e-5)


@pytest.mark.slow
def test_dataloader_path_completes_the_uneven_last_global_batch_from_the_epochs_start(tmp_path):
    """84 images on the DataLoader path, 1 process with batch 16 against 2 with batch 8: the first 5 global batches
    hold the same images, augmented alike; the sixth is, with 1 process, the 4 images left over and, with 2, those 4
    completed to 16 with the first 12 images of the same epoch (as docs/distributed.md says Accelerate does), so
    both runs take 6 steps an epoch but the 2-process one trains its last step on 12 repeated images.

    Checked that it fails: in a scratch copy, the training DataLoader built with drop_last=True (the device path's
    rule) made the epochs 5 batches long and the test failed."""
    loader = ["data.loader=dataloader", "data.num_workers=0", "data.limit_train=84"]
    one = batches_of([*loader, "data.batch_size=16"])                   # one process: this one
    run("tests/dump_device_batches.py", str(tmp_path), *loader, "data.batch_size=8", procs=2)
    two0, two1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    for epoch in (0, 3):
        assert len(one[epoch]) == len(two0[epoch]) == len(two1[epoch]) == 6
        assert [len(y) for _, y in one[epoch]] == [16] * 5 + [4]
        assert all(len(y) == 8 for _, y in two0[epoch] + two1[epoch])
        for k in range(6):
            x, y = torch.cat([two0[epoch][k][0], two1[epoch][k][0]]), torch.cat([two0[epoch][k][1],
                                                                                 two1[epoch][k][1]])
            if k < 5:
                assert fingerprint(x, y) == fingerprint(*one[epoch][k])
            else:
                (x_last, y_last), (x_first, y_first) = one[epoch][5], one[epoch][0]
                assert fingerprint(x, y) == fingerprint(torch.cat([x_last, x_first[:12]]),
                                                        torch.cat([y_last, y_first[:12]]))


@pytest.mark.slow
def test_accumulation_with_a_short_last_window_two_processes_equal_one_process_with_the_whole_batch(tmp_path,
                                                                                                  cifar_root):
    """84 images, 2 processes x micro-batch 6 x grad_accum_steps 2 (global 24) against 1 process x batch 24: each
    epoch is 7 global micro-batches of 12, so 3 full windows and a last one of a single micro-batch (12 images, 6 on
    each rank); the 1-process run's last batch holds the same 12 images. Same weights (fp32, within 1e-5), 4 steps
    an epoch. The 2-process run is train.py with DDP's all-reduces recorded (tests/allreduce_train.py): gradients
    cross the ranks once per optimizer step, in the backward pass of its window's last micro-batch, and never in
    an earlier one's.

    Checked that it fails: in a scratch copy, train_step dividing the window's loss by 2 x the micro-batch size (a
    fixed window) instead of the images the window holds halved the short window's gradient and the weights
    differed by 0.03; and train_step without no_sync made every micro-batch all-reduce."""
    args = [*COMMON, f"data.root={cifar_root}"]
    (tmp_path / "allreduce").mkdir()
    run_both([*args, "data.batch_size=24", f"output_dir={tmp_path}/one"],
             [*args, "data.batch_size=6", "train.grad_accum_steps=2", f"output_dir={tmp_path}/two"],
             script="tests/allreduce_train.py", ALLREDUCE_LOG=str(tmp_path / "allreduce"))
    summary = read_json(tmp_path / "two" / "summary.json")
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 24
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    steps = [r["step"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
    for rank in (0, 1):
        log = read_json(tmp_path / "allreduce" / f"rank{rank}.json")
        assert log["windows"] == [2, 2, 2, 1] * 2
        by_step = {step: [micro for s, micro in log["calls"] if s == step] for step in range(1, 9)}
        buckets = len(by_step[1])
        assert buckets >= 1 and set(map(len, by_step.values())) == {buckets}      # the same buckets every step
        assert all(set(micro) == {log["windows"][step - 1]} for step, micro in by_step.items())


# Every augmentation beyond crop and flip at once (cifar/augment.py): a policy, erasing, Cutout, MixUp and CutMix.
AUGMENTED = ("data.policy=trivialaugment", "data.erasing=0.5", "data.cutout=8", "data.mixup_alpha=0.4",
             "data.cutmix_alpha=1.0", "train.label_smoothing=0.1")


@pytest.mark.parametrize("loader, policy", [("dataloader", "data.policy=trivialaugment"),
                                            ("device", "data.policy=none")])
def test_halving_the_batch_changes_no_augmented_image_and_no_target(loader, policy):
    """What 2 processes x batch b see, in this process: rank r's micro-batch of global step k is batch 2k + r of a
    1-process run with batch b (the device path slices order[k 2b + r b : ...]; Accelerate's batch sampler gives
    rank r the (2k + r)-th batch of b). So with every augmentation on, batch k of 2b must be batches 2k and 2k + 1
    of b side by side, pixel for pixel and target for target: the policy, erasing and Cutout depend on (seed, epoch,
    index) only, and MixUp/CutMix pairs (2i, 2i + 1) never straddle two halves. The 2-process run itself is the
    slow test below.

    Checked that it fails: in a scratch copy, pairing position i with b - 1 - i (timm's flip) instead of i ^ 1 made
    both loaders' batches differ, and the policy drawing from torch's global stream unseeded the DataLoader's."""
    args = ["data.limit_train=64", "data.num_workers=0", f"data.loader={loader}", *AUGMENTED[1:], policy]
    whole, halves = batches_of([*args, "data.batch_size=16"]), batches_of([*args, "data.batch_size=8"])
    for epoch in (0, 3):
        assert len(whole[epoch]) == 4 and len(halves[epoch]) == 8
        for k, (x, y) in enumerate(whole[epoch]):
            (x0, y0), (x1, y1) = halves[epoch][2 * k], halves[epoch][2 * k + 1]
            assert y.shape == (16, 10)                          # soft targets: the batch was mixed
            assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch_under_every_augmentation(baseline):
    """DOUBLE_BATCH (84 images, global batch 12) with a policy, erasing, Cutout, MixUp, CutMix and label smoothing
    on the DataLoader path: 2 processes x 6 train the weights 1 process x 12 trains (fp32, within 1e-5), and log the
    same global losses.

    Checked that it fails: in a scratch copy, MixUp/CutMix pairing position i with b - 1 - i of the micro-batch
    (timm's batch mode) made the weights differ by 0.014."""
    with ThreadPoolExecutor(2) as pool:
        one = pool.submit(baseline, *DOUBLE_BATCH, *AUGMENTED, "data.batch_size=12")
        two = pool.submit(baseline, *DOUBLE_BATCH, *AUGMENTED, "data.batch_size=6", procs=2)
        one, two = one.result(), two.result()
    assert read_json(two / "summary.json")["world_size"] == 2
    assert max_diff(weights(one), weights(two)) <= 1e-5
    assert len(losses(one)) == 14 and losses(one) == pytest.approx(losses(two), abs=1e-5)
    # and the augmentations did train something else than the plain pair
    assert max_diff(weights(one), weights(baseline(*DOUBLE_BATCH, "data.batch_size=12"))) > 1e-3
