"""Checkpoints: what a resume picks and refuses, in this process (train.py's main called here, its messages read as
the CLI prints them); the kills and signals, which need real processes, are in test_checkpoint_kill.py."""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import DEBUG, ROOT, command, env, read_json, read_jsonl, run, weights
from inprocess import status
from safetensors.torch import load_file, save_file
from test_resume_changes import train_main

from cifar.checkpoint import Checkpoints, verify
from cifar.config import load_config
from cifar.resume import config_diff

# The debug run: 2048 synthetic images, batch 32, 3 epochs = 192 steps; a checkpoint every 8 steps and at each
# epoch end. RECIPE is it, as conftest.DEBUG spells it, so that every file shares one training of it.
RECIPE = list(DEBUG)


def bitwise_equal(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def steps_of(run_dir):
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(n.split("-")[1]) for n in os.listdir(folder) if n.startswith("step-")) if os.path.isdir(
        folder) else []


def launch(args, procs=1, **kw):
    """Start train.py in its own process group (so a kill reaches the launcher and every rank)."""
    return subprocess.Popen(command("train.py", args, procs), cwd=ROOT, env=env(**kw), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def kill_tree(proc):
    """SIGKILL the launcher and every process under it (torchrun puts ranks in their own process groups),
    as a node failure would."""
    everyone = [proc.pid] + [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    for pid in everyone:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.communicate()


def wait_for(predicate, timeout=120, proc=None, interval=0.05):
    """Poll until predicate() holds (or proc ends: then whether it holds); fails after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc is not None and proc.poll() is not None:
            return predicate()
        time.sleep(interval)
    raise AssertionError("timed out waiting")


def metric_rows(run_dir):
    """metrics.jsonl without the timing fields, which differ between any two runs."""
    timing = {"images_per_sec", "epoch_time", "data_wait"}
    return [{k: v for k, v in r.items() if k not in timing} for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl"))]


def train_as_process(capsys, caplog, *args) -> SimpleNamespace:
    """train.py's main in this process, as a finished process reads: returncode, stdout (the info lines) and stderr
    (the warning lines, then what was printed there: an error line). Under pytest the cifar logger's records go to
    caplog, not to the streams."""
    capsys.readouterr()
    caplog.clear()
    with caplog.at_level("INFO", logger="cifar"):
        code = status(train_main, *args)
    out, err = capsys.readouterr()
    said = [r for r in caplog.records if r.name == "cifar"]
    info = "".join(f"{r.getMessage()}\n" for r in said if r.levelname == "INFO")
    warnings = "".join(f"warning: {r.getMessage()}\n" for r in said if r.levelname == "WARNING")
    return SimpleNamespace(returncode=code, stdout=info + out, stderr=warnings + err)


@pytest.fixture(scope="module")
def reference(baseline):
    return baseline(*RECIPE)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """The debug run's first 24 steps (checkpoints step-16 and step-24 kept), trained here once; tests get a copy."""
    out = tmp_path_factory.mktemp("short") / "run"
    train_main([*RECIPE, "train.max_steps=24", f"output_dir={out}"])
    assert steps_of(out) == [16, 24]
    return out


@pytest.fixture
def short(short_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(short_run, out)
    return out


@pytest.mark.parametrize("damage", ["truncate", "bitflip"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(short, capsys, caplog, damage):
    out = short
    newest = out / "checkpoints" / "step-24" / "training.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    assert verify(str(out / "checkpoints" / "step-24")) is not None
    proc = train_as_process(capsys, caplog, *RECIPE, "train.max_steps=32", f"output_dir={out}")
    assert proc.returncode == 0, proc.stderr
    assert "step-24 is unusable" in proc.stderr and ("truncated" in proc.stderr or "corrupted" in proc.stderr)
    assert "resuming from" in proc.stdout and "step-16" in proc.stdout
    assert read_json(out / "summary.json")["steps"] == 32


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(tmp_path, capsys, caplog):
    """Two good steps, each checkpointed; then resumed with optim.lr=1e30 (applied from step 3): the loss turns NaN,
    and the row at step 16 stops the run. (With 1e30 from step 1 nothing is ever saved: step 1's weights are
    already beyond what a checkpoint may hold, cifar/divergence.py.)"""
    out = tmp_path / "run"
    args = ["--config", "configs/debug.yaml", "schedule.warmup_steps=0", "schedule.name=constant",
            f"output_dir={out}"]
    assert train_as_process(capsys, caplog, *args, "train.max_steps=2", "checkpoint.every_steps=1").returncode == 0
    proc = train_as_process(capsys, caplog, *args, "optim.lr=1e30", "train.max_steps=64")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: training diverged") and "Traceback" not in proc.stderr
    assert "the loss became nan" in lines[-1]
    good = steps_of(out)
    assert good == [1, 2] and all(verify(str(out / "checkpoints" / f"step-{s}")) is None for s in good)
    newest = load_file(str(out / "checkpoints" / f"step-{good[-1]}" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in newest.values())


def test_pruning_keeps_the_newest_and_the_best(tmp_path):
    out = tmp_path / "run"
    train_main([*RECIPE, "checkpoint.keep_last=2", "checkpoint.keep_best=1", "train.epochs=4",
                "data.limit_train=512", "optim.lr=0.05", f"output_dir={out}"])
    evals = [r for r in read_jsonl(out / "metrics.jsonl") if "test/acc" in r]
    best = max(evals, key=lambda r: (r["test/acc"], r["step"]))["step"]
    kept = steps_of(out)
    # saved: every 8 steps and at each epoch end (16 steps) = 8, 16, ..., 64; ranked by accuracy: epoch ends only
    expected = sorted({56, 64, best})
    assert kept == expected
    assert (out / "checkpoints" / "best").read_text().strip() == f"step-{best}"
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-64"


def test_resume_with_another_model_is_one_clear_line(short, capsys, caplog):
    proc = train_as_process(capsys, caplog, *RECIPE, "train.max_steps=24", "model.name=resnet18", f"output_dir={short}")
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "model tutorial_net" in line and "model.name=tutorial_net" in line and "Traceback" not in proc.stderr


def test_resume_with_another_shape_is_one_clear_line(short, capsys, caplog):
    ckpt = short / "checkpoints" / "step-24"
    state = load_file(str(ckpt / "model.safetensors"))
    state["fc3.weight"] = torch.zeros(12, 84)                   # e.g. a changed model definition
    save_file(state, str(ckpt / "model.safetensors"))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    data = (ckpt / "model.safetensors").read_bytes()
    manifest["files"]["model.safetensors"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    proc = train_as_process(capsys, caplog, *RECIPE, "train.max_steps=32", f"output_dir={short}")
    assert proc.returncode == 2 and "fc3.weight" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_resume_never_refuses_a_folder_with_checkpoints(short, capsys, caplog):
    never = [*RECIPE, "train.max_steps=8", "checkpoint.resume=never", f"output_dir={short}"]
    proc = train_as_process(capsys, caplog, *never)
    assert proc.returncode == 2 and "checkpoint.overwrite=true" in proc.stderr
    assert train_as_process(capsys, caplog, *never, "checkpoint.overwrite=true").returncode == 0
    assert steps_of(short) == [8]


@pytest.mark.slow
def test_explicit_resume_path_and_evaluate_on_a_checkpoint(tmp_path, reference):
    out = tmp_path / "other"
    run("train.py", *RECIPE, f"checkpoint.resume={reference}/checkpoints/step-184", f"output_dir={out}")
    assert bitwise_equal(reference, out)
    proc = run("evaluate.py", "--checkpoint", str(reference / "checkpoints" / "step-184"), "--output",
               str(tmp_path / "e"))
    assert "Accuracy of the network" in proc.stdout
    latest = run("evaluate.py", "--checkpoint", str(reference), "--pick", "best", "--output", str(tmp_path / "b"))
    assert read_json(tmp_path / "b" / "eval.json")["checkpoint"].endswith(
        (reference / "checkpoints" / "best").read_text().strip() + "/model.safetensors")
    assert latest.returncode == 0


def test_should_save_decides_when_a_checkpoint_is_due(tmp_path):
    """every_steps saves mid-epoch, except on an epoch's last step, which waits for the epoch's evaluation; a stop
    saves at once; an epoch end saves on every_epochs, on a pending step save, and at the last epoch."""
    def policy(*overrides, total_steps=40, epochs=4):
        cfg = load_config(os.path.join(ROOT, "configs", "debug.yaml"), list(overrides))
        accelerator = SimpleNamespace(is_main_process=True, scaler=None)
        return Checkpoints(str(tmp_path), cfg, accelerator, model=None, optimizer=None, scheduler=None,
                           total_steps=total_steps, epochs=epochs)

    every8 = policy("checkpoint.every_steps=8", "checkpoint.every_epochs=null")
    assert [s for s in range(1, 41) if every8.should_save(s)] == [8, 16, 24, 32]       # not 40: the run's end
    assert not every8.should_save(8, last_window=True)                                 # waits for the epoch end
    assert every8.should_save(8, epoch_end=0)
    assert every8.should_save(3, stopping=True) and not every8.should_save(3)
    assert [e for e in range(4) if every8.should_save(10 * (e + 1), epoch_end=e)] == [3]   # only the last epoch
    every2 = policy("checkpoint.every_epochs=2")
    assert [e for e in range(4) if every2.should_save(10 * (e + 1), epoch_end=e)] == [1, 3]
    assert not every2.should_save(5)


GLOBAL_BATCH_REFUSAL = re.compile(r"^error: checkpoint \S+/checkpoints/step-4 was trained with a global batch of 8, "
                                  r"this run has 16 ")


@pytest.mark.slow
def test_resume_with_another_global_batch_is_refused_with_one_line(tmp_path, capsys, caplog):
    """A checkpoint saved at global batch 8 (1 process, batch 8) is refused, exit 2, with one line naming both
    global batches, when resumed with data.batch_size=16 (1 process) or by 2 processes with the same batch_size;
    the checkpoint is left as it was. Under `accelerate launch` each rank prints that line and exits 2 (the
    launcher then exits 1 with its own report, SIGTERMing a rank still on its way out); no traceback of ours.

    Checked that it fails: with the global-batch check in cifar/engine.py's start_run removed (in a scratch copy of
    the tree), both reruns resumed and trained (exit 0) and the test failed at the exit-code assertion. Before
    54503c5 the refusal came after a warning that the run resumed with a different config, and the one-line
    assertion failed."""
    base = ["--config", "configs/debug.yaml", "data.limit_train=128", "data.limit_test=32", "checkpoint.every_steps=4"]
    out = tmp_path / "run"
    train_main([*base, "data.batch_size=8", "train.max_steps=4", f"output_dir={out}"])
    assert steps_of(out) == [4]
    shutil.copytree(out, tmp_path / "run2")          # a copy each, so the two reruns can run at once
    args = [*base, "train.max_steps=8"]
    # the launcher and its ranks start while the one-process rerun runs here
    wider = launch([*args, "data.batch_size=8", f"output_dir={tmp_path / 'run2'}"], procs=2)
    try:
        bigger = train_as_process(capsys, caplog, *args, "data.batch_size=16", f"output_dir={out}")
    finally:
        _, err2 = wider.communicate(timeout=300)
    err1 = bigger.stderr

    assert bigger.returncode == 2, err1[-3000:]
    assert "Traceback" not in err1
    assert wider.returncode != 0
    # the first rank out exits 2; the launcher then SIGTERMs any rank that has not exited yet
    codes = re.findall(r"^\s*exitcode\s+:\s*(-?\d+)", err2, re.M)
    assert len(codes) == 2 and "2" in codes and set(codes) <= {"2", "-15"}, err2[-3000:]
    assert not re.search(r'File ".*(train\.py|/cifar/)', err2), err2[-3000:]    # no traceback through our code
    for err in (err1, err2):
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert errors and all(GLOBAL_BATCH_REFUSAL.match(line) for line in errors), err[-3000:]
    assert steps_of(out) == steps_of(tmp_path / "run2") == [4]            # nothing trained, nothing saved
    # the refusal is the only line: no "resuming with a different config" warning before it
    assert len(err1.strip().splitlines()) == 1, err1
    assert not [line for line in err2.splitlines() if line.startswith("warning: ")], err2[-3000:]


def test_a_checkpoint_from_before_data_normalize_reads_it_as_cifar():
    """Such runs were normalised with the CIFAR statistics: resuming with data.normalize=cifar changes nothing, and
    without it the change is named as what it is (cifar -> tutorial), not None -> tutorial."""
    old = load_config("configs/debug.yaml").to_dict()
    del old["data"]["normalize"]
    assert config_diff(old, load_config("configs/debug.yaml", ["data.normalize=cifar"]).to_dict()) == {}
    assert config_diff(old, load_config("configs/debug.yaml").to_dict()) == {"data.normalize": ("cifar", "tutorial")}
