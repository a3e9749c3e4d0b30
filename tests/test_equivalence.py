"""The distributed and accumulation claims: the same data and the same update, whatever the layout."""
import os

import pytest
from conftest import max_diff, read_json, read_jsonl, run, weights

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
