"""The run's record says what was trained, whatever a rerun changes: resuming with a changed config applies each
key from the resume step (recorded), or refuses it in one line before anything is written (cifar/resume.py); a
rerun of a finished run writes nothing; a diverged step is never saved; a checkpoint this version cannot read
honestly is one line, never a traceback.

One finished training run (8 steps, checkpoints at 4 and 8), trained in this process, is shared; each test works on a
copy. Refusals, the rerun and the divergences (CIFAR_FAULT set in this process) run train.py's main in this process
too; the test of what a resume records in W&B starts train.py, with W&B's own processes."""
import hashlib
import io
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import ROOT, read_json, read_jsonl, run
from inprocess import entry, status
from safetensors.torch import load_file

from cifar.checkpoint import follow_config, newest_valid, verify
from cifar.divergence import check_weights
from cifar.errors import Diverged
from cifar.schedule import lr_factor

ARGS = ["--config", os.path.join(ROOT, "configs", "debug.yaml"), "data.limit_train=256", "data.limit_test=64",
        "train.log_every_steps=2", "checkpoint.every_steps=4", "checkpoint.keep_last=3",
        "train.keep_freed_memory=false"]   # 8 steps an epoch; the test process's malloc left alone
FIX = "start over with checkpoint.resume=never checkpoint.overwrite=true"


train_main = entry("train.py")


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("finished") / "run"
    train_main([*ARGS, "train.max_steps=8", f"output_dir={out}"])      # in this process: ~2 s, no interpreter to start
    assert read_json(out / "status.json")["state"] == "finished"
    return out


@pytest.fixture
def copy(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


def snapshot(folder) -> dict:
    """Every file under folder, dotfiles too: its SHA-256 and mtime."""
    out = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = (hashlib.sha256(f.read()).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def train_in_process(capsys, *args) -> tuple[int, str, str]:
    """train.py's main here: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = status(train_main, *args)
    out, err = capsys.readouterr()
    return code, out, err


def one_error_line(code: int, err: str) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def rewrite(checkpoint, name: str, data: bytes) -> None:
    """Replace one file of a checkpoint and its manifest entry, so that it still verifies: what a checkpoint written
    by another version looks like."""
    (checkpoint / name).write_bytes(data)
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    assert verify(str(checkpoint)) is None


def inspect(wandb_run, *flags) -> str:
    """An offline W&B run's records, as `wandb leet inspect --json` prints them."""
    return subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", *flags, "--json", str(wandb_run)],
                          check=True, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL).stdout


# ----------------------------------------------------------------------------- applied from the resume step

@pytest.mark.slow
def test_lr_weight_decay_clip_and_length_apply_from_the_resume_step_and_are_recorded(finished, copy):
    """Train longer with another lr, weight decay and clipping: each applied from step 9, one line each; the lr
    column is the new schedule's, the saved optimizer really holds it; config.yaml (and W&B's config) is the config
    in force, summary.json, state.json and a metrics.jsonl row at step 8 (a W&B row too) hold the history."""
    changed = ["train.max_steps=16", "optim.lr=0.5", "optim.weight_decay=0.001", "train.grad_clip=1.0"]
    proc = run("train.py", *ARGS, *changed, f"output_dir={copy}", WANDB_MODE="offline", WANDB_SILENT="true")
    applied = [line for line in proc.stdout.splitlines() if "applied from step" in line]
    assert applied == [f"resuming at step 8 with {key}: {old} -> {new}, applied from step 9 on (recorded in "
                       f"summary.json's config_changes)" for key, old, new in
                       [("optim.lr", 0.02, 0.5), ("optim.weight_decay", 0.0, 0.001), ("train.grad_clip", "null", 1.0),
                        ("train.max_steps", 8, 16)]]
    history = [{"step": 8, "key": "optim.lr", "from": 0.02, "to": 0.5},
               {"step": 8, "key": "optim.weight_decay", "from": 0.0, "to": 0.001},
               {"step": 8, "key": "train.grad_clip", "from": None, "to": 1.0},
               {"step": 8, "key": "train.max_steps", "from": 8, "to": 16}]

    rows, before = read_jsonl(copy / "metrics.jsonl"), read_jsonl(finished / "metrics.jsonl")
    assert rows[:len(before)] == before                                  # the first 8 steps' rows, as they were
    assert rows[len(before)] == {"step": 8, "config_changes": {c["key"]: {"from": c["from"], "to": c["to"]}
                                                                for c in history}}
    later = [r for r in rows[len(before) + 1:] if "train/loss" in r]
    assert [r["step"] for r in later] == [10, 12, 14, 16]
    for r in later:   # the lr really used at that step: 0.5 on the 16-step cosine, at the position reached
        assert r["lr"] == pytest.approx(0.5 * lr_factor("cosine", r["step"] - 1, 16, 8), rel=1e-12), r
        assert "grad_norm" in r                                          # clipping is on from the resume
    assert all("grad_norm" not in r for r in before)

    summary = read_json(copy / "summary.json")
    assert summary["steps"] == 16 and summary["config_changes"] == history
    saved = yaml.safe_load((copy / "config.yaml").read_text())
    assert (saved["optim"]["lr"], saved["optim"]["weight_decay"], saved["train"]["grad_clip"],
            saved["train"]["max_steps"]) == (0.5, 0.001, 1.0, 16)
    newest = copy / "checkpoints" / "step-16"
    assert read_json(newest / "state.json")["state"]["config_changes"] == history
    training = torch.load(newest / "training.pt", weights_only=True)
    assert training["scheduler"]["base_lrs"] == [0.5]
    group = training["optimizer"]["param_groups"][0]
    assert (group["initial_lr"], group["weight_decay"]) == (0.5, 0.001)

    # W&B (offline, read back): the config in force, the row at step 8, and the history in the summary
    (wandb_run,) = [p for p in (copy / "wandb").iterdir() if p.name.startswith("offline-run-")]
    record = json.loads(inspect(wandb_run, "--summary"))
    assert record["config"]["optim"]["lr"] == 0.5 and record["summary"]["config_changes"] == history
    logged = [json.loads(line) for line in inspect(wandb_run).splitlines() if line.strip()]
    rows = [r["history"]["item"] for r in logged if r["type"] == "history"]
    assert {k: v for k, v in rows[0].items() if k.startswith("config_changes/")} == {
        f"config_changes/{c['key']}/{end}": c[end] for c in history for end in ("from", "to") if c[end] is not None}
    assert rows[0]["global_step"] == 8


def test_follow_config_keeps_a_same_config_resume_bitwise_and_moves_a_changed_lr():
    """The optimizer's base lr and weight decay follow the config at the restored schedule position: with the saved
    config the lr is bitwise the saved one; with another lr and length, the new schedule's value at that step."""
    def build(lr, total):
        net = torch.nn.Linear(3, 2)
        opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor("cosine", s, total, 2))
        return net, opt, sched

    net, opt, sched = build(0.02, 10)
    for _ in range(5):
        net(torch.randn(4, 3)).sum().backward()
        opt.step()
        sched.step()
    saved = {"optimizer": opt.state_dict(), "scheduler": sched.state_dict()}

    def restored(lr, total):
        _, opt2, sched2 = build(lr, total)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in opt2.param_groups]
        opt2.load_state_dict(saved["optimizer"])
        sched2.load_state_dict(saved["scheduler"])
        follow_config(opt2, sched2, configured)
        return opt2, sched2

    same, _ = restored(0.02, 10)
    assert same.param_groups[0]["lr"] == opt.param_groups[0]["lr"]            # bitwise
    moved, sched2 = restored(0.5, 20)
    assert moved.param_groups[0]["lr"] == 0.5 * lr_factor("cosine", 5, 20, 2)
    sched2.step()
    assert moved.param_groups[0]["lr"] == 0.5 * lr_factor("cosine", 6, 20, 2)


# ----------------------------------------------------------------------------- refused, nothing changed

@pytest.mark.parametrize("override, key, old", [
    ("optim.name=adamw", "optim.name", "sgd"),
    ("seed=1", "seed", "0"),
    ("data.augment=false", "data.augment", "true"),
    ("schedule.name=linear", "schedule.name", "cosine"),
    ("optim.momentum=0.5", "optim.momentum", "0.9"),
    ("train.label_smoothing=0.1", "train.label_smoothing", "0.0"),
])
def test_a_change_that_would_rewrite_history_is_refused_in_one_line_and_changes_nothing(copy, capsys, override,
                                                                                       key, old):
    before = snapshot(copy)
    code, out, err = train_in_process(capsys, *ARGS, "train.max_steps=16", override, f"output_dir={copy}")
    line = one_error_line(code, err)
    assert f"with another {key} ({key}: {old} -> " in line and f"resume with {key}={old}," in line and FIX in line
    assert snapshot(copy) == before


def test_several_refused_keys_are_named_in_the_one_line(copy, capsys):
    before = snapshot(copy)
    code, _, err = train_in_process(capsys, *ARGS, "optim.name=adamw", "seed=3", "optim.lr=0.5",
                                    f"output_dir={copy}")
    line = one_error_line(code, err)
    assert "another optim.name, seed (optim.name: sgd -> adamw, seed: 0 -> 3)" in line
    assert "resume with optim.name=sgd seed=0," in line and "optim.lr" not in line      # lr alone would apply
    assert snapshot(copy) == before


@pytest.mark.parametrize("override, expected", [
    ("model.name=resnet18", "is for model tutorial_net, this run is model resnet18; resume with "
                            "model.name=tutorial_net"),
    ("data.dataset=cifar100", "was trained on data.dataset=cifar10, this run is data.dataset=cifar100; resume "
                              "with data.dataset=cifar10"),
    ("data.batch_size=16", "was trained with a global batch of 32, this run has 16 "),
])
def test_model_dataset_and_global_batch_keep_their_refusals(copy, capsys, override, expected):
    before = snapshot(copy)
    code, _, err = train_in_process(capsys, *ARGS, override, f"output_dir={copy}")
    assert expected in one_error_line(code, err)
    assert snapshot(copy) == before


def test_an_older_checkpoint_with_changes_is_refused_while_newer_ones_stay(copy, capsys):
    """step-8 would stay, from the old settings, for a later resume=auto to pick up (a save at step 8 keeps a
    valid checkpoint it finds there): refused, nothing changed; the same resume in another folder is the way."""
    before = snapshot(copy)
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=8", "optim.lr=0.5",
                                    f"checkpoint.resume={copy}/checkpoints/step-4",
                                    f"output_dir={copy}")
    line = one_error_line(code, err)
    assert f"cannot resume {copy}/checkpoints/step-4 with another optim.lr: the folder's newer step-8 would stay" in line
    assert f"checkpoint.resume={copy}/checkpoints/step-4 output_dir=<new folder>" in line
    assert snapshot(copy) == before


def test_a_length_that_ends_before_the_checkpoint_is_refused(copy, capsys):
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=4", f"output_dir={copy}")
    line = one_error_line(code, err)
    assert "with train.max_steps=4 the run ends at step 4, but checkpoint" in line and "is at step 8" in line
    assert read_json(copy / "summary.json")["steps"] == 8


# ----------------------------------------------------------------------------- a finished run: nothing to do

@pytest.mark.parametrize("free", [[], ["data.num_workers=1", "train.log_every_steps=1", "wandb.mode=offline"]])
def test_rerunning_a_finished_run_changes_no_byte(copy, capsys, caplog, free):
    """The same command again (or with keys free to change): one line, exit 0, no file written or touched, no W&B
    run."""
    before = snapshot(copy)
    with caplog.at_level("INFO", logger="cifar"):
        code, out, err = train_in_process(capsys, *ARGS, "train.max_steps=8", *free, f"output_dir={copy}")
    assert code == 0 and err == "", err
    said = [r.getMessage() for r in caplog.records if r.name == "cifar"]
    assert said == [f"{copy} already finished (step 8); nothing to do; evaluate.py --checkpoint {copy} to evaluate "
                    f"it again"]
    assert snapshot(copy) == before
    assert not (copy / "wandb").exists()


# ----------------------------------------------------------------------------- checkpoints this version cannot read

def _state(copy) -> dict:
    return json.loads((copy / "checkpoints" / "step-8" / "state.json").read_text())


@pytest.mark.parametrize("damage, expected", [
    (lambda s: {**s, "state": {**s["state"], "from_the_future": 1}},
     "holds state this version does not know (from_the_future): it was written by a newer version"),
    (lambda s: {**s, "state": {k: v for k, v in s["state"].items() if k != "step"}}, "state.json lacks step"),
    (lambda s: {"state": s["state"]}, "state.json lacks its 'state' or 'config' section"),
    (None, "state.json is not valid JSON"),
])
def test_a_state_json_this_version_cannot_use_is_one_line(copy, capsys, damage, expected):
    data = b'{"state": {"step": 8,' if damage is None else json.dumps(damage(_state(copy))).encode()
    rewrite(copy / "checkpoints" / "step-8", "state.json", data)
    before = snapshot(copy)
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=16", f"output_dir={copy}")
    line = one_error_line(code, err)
    assert expected in line and FIX in line
    assert snapshot(copy) == before


def test_a_training_pt_that_needs_unpickling_is_refused_without_torchs_advice(copy, capsys):
    """What weights-only loading refuses (here a numpy array, as an older version might have pickled the RNG
    states) is named and refused; torch's advice to load it with weights_only=False never reaches the user."""
    checkpoint = copy / "checkpoints" / "step-8"
    training = torch.load(checkpoint / "training.pt", weights_only=True)
    training["rng"] = [np.zeros(3)]
    buffer = io.BytesIO()
    torch.save(training, buffer)
    rewrite(checkpoint, "training.pt", buffer.getvalue())
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=16", f"output_dir={copy}")
    line = one_error_line(code, err)
    assert f"{checkpoint}/training.pt is refused: loading it would need arbitrary unpickling" in line
    assert "numpy" in line and "weights_only" not in err and "trust" not in err
    assert read_json(copy / "status.json")["state"] == "finished" and read_json(copy / "summary.json")["steps"] == 8


def test_optimizer_state_for_other_parameter_groups_is_one_line(copy, capsys):
    """A training.pt whose optimizer state holds another number of parameter groups than the config builds (a
    hand-edited checkpoint, or one from a version that grouped parameters differently): one line naming the file
    and the fix, never torch's ValueError; nothing of the run folder changes."""
    checkpoint = copy / "checkpoints" / "step-8"
    training = torch.load(checkpoint / "training.pt", weights_only=True)
    groups = training["optimizer"]["param_groups"]
    training["optimizer"]["param_groups"] = groups + [dict(groups[0], params=[])]
    buffer = io.BytesIO()
    torch.save(training, buffer)
    rewrite(checkpoint, "training.pt", buffer.getvalue())
    before = snapshot(copy)
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=16", f"output_dir={copy}")
    line = one_error_line(code, err)
    assert f"checkpoint {checkpoint} has optimizer state for other parameter groups" in line
    assert "resume with the optim and model settings it was saved with" in line and "Traceback" not in err
    after = snapshot(copy)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}


# ----------------------------------------------------------------------------- divergence

def all_finite(path) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in load_file(str(path)).values())


def test_weights_are_diverged_when_not_finite_or_beyond_the_square_root_of_float32s_largest():
    """1.8e19 and below is left alone (a long way from any real weight); beyond, or NaN/inf, in the weights or in
    their moving average, is Diverged, naming which tensor and the last good checkpoint."""
    net, average = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    models = {"weight": net, "moving-average weight": average}
    with torch.no_grad():
        net.weight.fill_(1.8e19)
    check_weights(models, 7, "runs/r/checkpoints/step-4")
    for bad in (2e19, math.inf, math.nan):
        with torch.no_grad():
            average.bias[1] = bad
        with pytest.raises(Diverged, match=r"^training diverged at step 7: moving-average weight bias "
                                           r"(reaches 2e\+19|is not finite); not saved, the newest checkpoint "
                                           r"runs/r/checkpoints/step-4 is the last good one; lower optim.lr"):
            check_weights(models, 7, "runs/r/checkpoints/step-4")


def test_a_last_step_divergence_fails_and_saves_nothing_of_it(tmp_path, capsys, monkeypatch):
    """The weights blow up in the very last step (the loss before it was fine): the evaluation's loss is NaN, the
    run fails (exit 2, one line naming the last good checkpoint and the fix), status.json says why, no final weights
    are written and best/latest stay finite checkpoints, the newest being what a rerun resumes from."""
    out = tmp_path / "run"
    monkeypatch.setenv("CIFAR_FAULT", "poison-weights:16")
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=16", f"output_dir={out}")
    line = one_error_line(code, err)
    assert line == (f"error: training diverged at step 16: the test loss is nan; not saved, the newest checkpoint "
                    f"{out}/checkpoints/step-12 is the last good one; lower optim.lr or set train.grad_clip, then "
                    f"rerun: it resumes from that checkpoint")
    status = read_json(out / "status.json")
    assert status["state"] == "failed" and status["error"].startswith("Diverged: training diverged at step 16")
    assert not (out / "model.safetensors").exists() and not (out / "summary.json").exists()
    folder = out / "checkpoints"
    assert (folder / "latest").read_text().strip() == "step-12" and (folder / "best").read_text().strip() == "step-8"
    assert sorted(os.listdir(folder)) == ["best", "latest", "step-12", "step-4", "step-8"]
    assert all(all_finite(folder / f"step-{s}" / "model.safetensors") for s in (4, 8, 12))
    assert newest_valid(str(folder)) == str(folder / "step-12")


def test_finite_but_absurd_weights_mid_run_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    """Weights times 1e30 after step 12 (finite, the step before an inf): the step-12 save refuses them, and their
    moving average; step-8 stays the newest checkpoint, finite, and nothing else is written."""
    out = tmp_path / "run"
    monkeypatch.setenv("CIFAR_FAULT", "inflate-weights:12")
    code, _, err = train_in_process(capsys, *ARGS, "train.max_steps=16", "train.ema.decay=0.9", f"output_dir={out}")
    line = one_error_line(code, err)
    assert line.startswith("error: training diverged at step 12: weight ") and " reaches " in line
    assert f"the newest checkpoint {out}/checkpoints/step-8 is the last good one" in line
    assert read_json(out / "status.json")["state"] == "failed"
    folder = out / "checkpoints"
    assert sorted(n for n in os.listdir(folder) if n.startswith("step-")) == ["step-4", "step-8"]
    assert not [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    assert (folder / "latest").read_text().strip() == "step-8" and not (out / "model.safetensors").exists()
    for name in ("model.safetensors", "model-ema.safetensors"):
        assert all_finite(folder / "step-8" / name)
    rows = read_jsonl(out / "metrics.jsonl")
    assert max(r["step"] for r in rows) == 12           # the rows of steps trained, nothing after the failure
