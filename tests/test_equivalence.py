"""The distributed and accumulation claims: the same data and the same update, whatever the layout."""
import os
import subprocess

import pytest
import torch
from conftest import ROOT, command, env, max_diff, read_json, read_jsonl, run, weights

COMMON = ["--config", "configs/tutorial.yaml", "data.augment=true", "data.num_workers=0", "optim.lr=0.05",
          "train.epochs=2", "train.log_every_steps=1"]


@pytest.mark.slow
def test_two_processes_equal_one_process_with_double_batch(tmp_path, cifar_root):
    # 84 images, global batch 12: 7 steps per epoch, evenly split between the two ranks.
    run("train.py", *COMMON, f"data.root={cifar_root}", "data.batch_size=12", f"output_dir={tmp_path}/one")
    two = run("train.py", *COMMON, f"data.root={cifar_root}", "data.batch_size=6", f"output_dir={tmp_path}/two",
              procs=2)
    assert read_json(tmp_path / "two" / "summary.json")["world_size"] == 2
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    # the logged losses are global means, so they agree too
    l1 = [r["train/loss"] for r in read_jsonl(tmp_path / "one" / "metrics.jsonl") if "train/loss" in r]
    l2 = [r["train/loss"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert l1 == pytest.approx(l2, abs=1e-5)
    # and only the main process wrote the run folder's log (one row per step, not two)
    assert len(l2) == 14
    # other ranks are silent: the config and the summary are printed once
    assert two.stdout.count("run folder:") == 1 and two.stdout.count("final_test_acc") == 1


@pytest.mark.slow
def test_accumulation_matches_double_batch_with_partial_last_window(tmp_path, cifar_root):
    # 84 images, micro-batch 8: 11 micro-batches per epoch (the last holds 4), windows of 2 -> the last window is
    # one short micro-batch. Batch 16: 6 steps, the last of 4 images. Same samples per step, same weights.
    run("train.py", *COMMON, f"data.root={cifar_root}", "data.batch_size=16", f"output_dir={tmp_path}/big")
    run("train.py", *COMMON, f"data.root={cifar_root}", "data.batch_size=8", "train.grad_accum_steps=2",
              f"output_dir={tmp_path}/acc")
    assert max_diff(weights(tmp_path / "big"), weights(tmp_path / "acc")) <= 1e-5
    steps = [r["step"] for r in read_jsonl(tmp_path / "acc" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 13))


@pytest.mark.slow
def test_eval_counts_every_image_once_under_two_processes(tmp_path, cifar_root):
    run("train.py", *COMMON, f"data.root={cifar_root}", "train.epochs=1", "data.batch_size=16",
        f"output_dir={tmp_path}/r")
    # 37 test images with per-process batch 5: uneven across ranks and within the last batch
    run("evaluate.py", "--checkpoint", str(tmp_path / "r"), "--output", str(tmp_path / "e1"), "data.eval_batch_size=5")
    run("evaluate.py", "--checkpoint", str(tmp_path / "r"), "--output", str(tmp_path / "e2"), "data.eval_batch_size=5",
        procs=2)
    e1, e2 = read_json(tmp_path / "e1" / "eval.json"), read_json(tmp_path / "e2" / "eval.json")
    assert e2["world_size"] == 2 and e1["world_size"] == 1
    assert e1["count"] == e2["count"] == 37
    assert sum(map(sum, e2["confusion"])) == 37
    assert e1["confusion"] == e2["confusion"]
    assert e1["accuracy"] == pytest.approx(e2["accuracy"])
    assert e1["loss"] == pytest.approx(e2["loss"], rel=1e-6)
    # the 2-process training run's own final evaluation agrees as well
    assert os.path.exists(tmp_path / "e2" / "confusion.png")


def run_both(one: list, two: list):
    """A 1-process and a 2-process run started together (3 processes on the 2 cores CI has: ~20% less wall time
    than one after the other)."""
    reference = subprocess.Popen(command("train.py", one), cwd=ROOT, env=env(), text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
    run("train.py", *two, procs=2)
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
    dumps = {}
    for name, procs, batch in (("one", 1, 16), ("two", 2, 8)):
        folder = tmp_path / name
        folder.mkdir()
        run("tests/dump_device_batches.py", str(folder), "data.loader=dataloader", "data.num_workers=0",
            "data.limit_train=84", f"data.batch_size={batch}", procs=procs)
        dumps[name] = [torch.load(folder / f"rank{r}.pt") for r in range(procs)]
    (one,), (two0, two1) = dumps["one"], dumps["two"]
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
    an epoch.

    Checked that it fails: in a scratch copy, train_step dividing the window's loss by 2 x the micro-batch size (a
    fixed window) instead of the images the window holds halved the short window's gradient and the weights
    differed by 0.03."""
    args = [*COMMON, f"data.root={cifar_root}"]
    run_both([*args, "data.batch_size=24", f"output_dir={tmp_path}/one"],
             [*args, "data.batch_size=6", "train.grad_accum_steps=2", f"output_dir={tmp_path}/two"])
    summary = read_json(tmp_path / "two" / "summary.json")
    assert summary["world_size"] == 2 and summary["global_batch_size"] == 24
    assert max_diff(weights(tmp_path / "one"), weights(tmp_path / "two")) <= 1e-5
    steps = [r["step"] for r in read_jsonl(tmp_path / "two" / "metrics.jsonl") if "train/loss" in r]
    assert steps == list(range(1, 9))
    assert losses(tmp_path / "one") == pytest.approx(losses(tmp_path / "two"), abs=1e-5)
