"""Top-k accuracy (train.top_k, default 5): every evaluation counts the test images whose label is among the k
highest logits, exactly like top-1 (counts summed over ranks, every image once), and reports it in the epoch rows of
metrics.jsonl and W&B (test/acc_top5), summary.json (final_test_acc_top5), evaluate.py's eval.json (accuracy_top5,
eval/acc_top5 in W&B) and python -m cifar.compare's table, where a run from before it shows "-"."""
import contextlib
import io
import json
import os
import pickle

import pytest
import torch
import yaml
from conftest import ROOT, read_json, read_jsonl, run, weights, write_cifar
from inprocess import entry

from cifar import compare, compare_output, tracking
from cifar.config import load_config
from cifar.evaluation import EvalResult
from cifar.models import TutorialNet
from cifar.resume import config_diff

N_TEST = 37      # odd: two ranks get 19 and 18 images; a padding sampler would count one twice


train, evaluate = entry("train.py"), entry("evaluate.py")


def run_args(root) -> list[str]:
    """The debug recipe on the CIFAR-10 files written under root, 2 optimizer steps."""
    return ["--config", os.path.join(ROOT, "configs", "debug.yaml"), "data.source=files", f"data.root={root}",
            "data.download=false", "data.normalize=tutorial", "data.batch_size=8", "train.max_steps=2"]


def hand_count(run_dir, root, k: int) -> int:
    """Test images whose label is among the k highest logits of the run's saved weights, counted here from the
    test_batch file: the tutorial's normalisation, the tutorial's Net, one batch."""
    with open(os.path.join(root, "cifar-10-batches-py", "test_batch"), "rb") as f:
        batch = pickle.load(f)
    images = torch.tensor(batch["data"]).view(-1, 3, 32, 32).float() / 255
    labels = torch.tensor(batch["labels"])
    net = TutorialNet()
    net.load_state_dict(weights(run_dir))
    with torch.no_grad():
        logits = net.eval()((images - 0.5) / 0.5)
    return int((logits.topk(k, dim=1).indices == labels[:, None]).any(1).sum())


@pytest.fixture
def recorded(monkeypatch):
    """What the project hands W&B (cifar/tracking.Tracker): the logged rows and the summaries."""
    rows, summaries = [], []
    monkeypatch.setattr(tracking.Tracker, "log", lambda self, row: rows.append(row))
    monkeypatch.setattr(tracking.Tracker, "summary", lambda self, values: summaries.append(values))
    monkeypatch.setenv("WANDB_MODE", "disabled")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)            # as conftest.run's processes (OMP_NUM_THREADS=1)
    yield rows, summaries
    torch.set_num_threads(threads)


def test_top5_is_a_hand_count_of_the_saved_models_logits_everywhere_it_is_reported(tmp_path, recorded):
    rows, summaries = recorded
    root = write_cifar(str(tmp_path / "data"), n_train=84, n_test=N_TEST)
    out = tmp_path / "run"
    train([*run_args(root), f"output_dir={out}"])
    top1, top5, top3 = (100.0 * hand_count(out, root, k) / N_TEST for k in (1, 5, 3))
    summary = read_json(out / "summary.json")
    assert summary["final_test_acc"] == top1           # the hand count sees what the evaluation saw
    assert summary["top_k"] == 5 and summary["final_test_acc_top5"] == top5 and top5 >= top1
    (epoch,) = [r for r in read_jsonl(out / "metrics.jsonl") if "test/acc" in r]
    assert epoch["test/acc_top5"] == top5 and epoch["test/count"] == N_TEST
    assert [r["test/acc_top5"] for r in rows if "test/acc_top5" in r] == [top5]        # W&B's epoch row
    assert summaries[-1]["final_test_acc_top5"] == top5

    rows.clear()
    evaluate(["--checkpoint", str(out)])
    report = read_json(out / "eval.json")
    assert (report["top_k"], report["accuracy_top5"], report["accuracy"]) == (5, top5, top1)
    assert [r["eval/acc_top5"] for r in rows if "eval/acc_top5" in r] == [top5]
    assert summaries[-1]["eval/acc_top5"] == top5
    # k is the config's: evaluate.py's override counts another k
    evaluate(["--checkpoint", str(out), "train.top_k=3", "--output", str(tmp_path / "k3")])
    report = read_json(tmp_path / "k3" / "eval.json")
    assert report["accuracy_top3"] == top3 and "accuracy_top5" not in report


def test_top_k_null_counts_none():
    result = EvalResult(loss=1.0, accuracy=50.0, per_class={}, confusion=[], count=2)
    assert "test/acc" in result.as_row() and not [k for k in result.as_row() if "top" in k]
    assert EvalResult(1.0, 50.0, {}, [], 2, top_k=3, top_k_accuracy=100.0).as_row("eval/")["eval/acc_top3"] == 100.0


def test_top_k_is_validated_and_a_run_from_before_it_resumes_unchanged():
    with pytest.raises(Exception, match="train.top_k"):
        load_config("configs/debug.yaml", ["train.top_k=0"])
    cfg = load_config("configs/debug.yaml", ["train.top_k=3"])
    older = yaml.safe_load(cfg.to_yaml())
    del older["train"]["top_k"], older["model"]["cifar_stem"]     # a checkpoint's config.yaml from before both
    assert config_diff(older, load_config("configs/debug.yaml").to_dict()) == {}
    # model.cifar_stem is the network's, never free: a change of it is a difference the resume refuses
    assert config_diff(older, load_config("configs/debug.yaml", ["model.name=torchvision:resnet18",
                                                                 "model.cifar_stem=true"]).to_dict()).keys() == \
        {"model.name", "model.cifar_stem"}


def fake_run(folder, seed: int, top5: float | None, test_acc: float = 50.0):
    """A run folder as compare reads it: config.yaml and metrics.jsonl with one evaluated epoch (top5 None: a run
    from before train.top_k)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.yaml"), "w") as f:
        yaml.safe_dump({"name": "debug", "seed": seed, "optim": {"lr": 0.02}}, f)
    row = {"step": 4, "epoch": 0, "epoch_time": 1.5, "train/epoch_loss": 2.0, "test/loss": 1.5, "test/acc": test_acc,
           **({"test/acc_top5": top5} if top5 is not None else {})}
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 4, "epoch": 0, "train/loss": 2.0}) + "\n" + json.dumps(row) + "\n")
    return str(folder)


def test_compare_shows_top5_when_a_run_has_it_and_old_runs_still_compare(tmp_path, capsys):
    new, old = fake_run(tmp_path / "new", 0, 91.5), fake_run(tmp_path / "old", 1, None, test_acc=40.0)
    png = str(tmp_path / "c.png")
    compare.main([new, old, "--each-run", "--format", "json", "--output", png])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["run"], r["final"], r["test/acc_top5"]) for r in rows] == [("new", 50.0, 91.5), ("old", 40.0, None)]
    # the other views without their PNG (the CLI wrote one above)
    header, _, *lines = shown("md", new, old, "--each-run").splitlines()[2:]
    assert "| final test/acc_top5 |" in header
    assert [line.split(" | ")[header.split(" | ").index("final test/acc_top5")] for line in lines] == ["91.50", "-"]
    # by seed (the two differ only in seed): the mean over the runs that have it
    (group,) = json.loads(shown("json", new, old))["rows"]
    assert group["n"] == 2 and group["test/acc_top5"] == 91.5 and group["test/acc_top5_std"] is None
    # runs that all predate top-k: no column
    assert "top5" not in shown("md", old)


def shown(fmt: str, *args: str) -> str:
    """What python -m cifar.compare ARGS --format FMT prints."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        compare_output.print_view(compare.build_view(compare.parse_args(list(args))), fmt)
    return out.getvalue()


@pytest.mark.slow
def test_top5_under_two_processes_equals_one_process_and_the_hand_count(tmp_path, monkeypatch):
    """Real DDP (accelerate launch, 2 processes on gloo): the training's evaluation splits the 37 test images 19 + 18
    and sums the counts; its top-5 is the 1-process evaluate.py's of the same weights, and the hand count's."""
    root = write_cifar(str(tmp_path / "data"), n_train=84, n_test=N_TEST)
    out = tmp_path / "ddp"
    run("train.py", *run_args(root), "data.batch_size=4", f"output_dir={out}", procs=2)
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 2
    assert summary["final_test_acc_top5"] == 100.0 * hand_count(out, root, 5) / N_TEST
    monkeypatch.setenv("WANDB_MODE", "disabled")
    evaluate(["--checkpoint", str(out)])
    report = read_json(out / "eval.json")
    assert (report["world_size"], report["count"]) == (1, N_TEST)
    assert (report["accuracy_top5"], report["accuracy"]) == (summary["final_test_acc_top5"],
                                                            summary["final_test_acc"])
