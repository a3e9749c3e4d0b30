"""A recipe with data.global_batch runs unchanged on any number of processes (train.grad_accum_steps follows), and a
run killed on one number of processes continues on another as the training the uninterrupted run would have done
(cifar/worlds.py; docs/distributed.md, "Another number of processes").

The slow tests kill real runs (CIFAR_FAULT=kill-after-save:N, cifar/checkpoint.py) in the middle of an epoch and
resume them on the other world size; both uninterrupted references are shared baselines. The refusals and the
derivation run in this process."""
import os
import shutil
from types import SimpleNamespace

import pytest
import torch
from conftest import max_diff, read_json, read_jsonl, run
from inprocess import refusal, train_here
from safetensors.torch import load_file
from test_checkpoint import steps_of
from test_resume_changes import snapshot

from cifar.checkpoint import Checkpoints
from cifar.config import DataConfig, load_config
from cifar.data import DeviceBatches, synthetic_split
from cifar.errors import UserError
from cifar.models import model_from_config
from cifar.optim import build_optimizer
from cifar.schedule import build_scheduler
from cifar.worlds import fit, process_counts, rng_source

# 512 synthetic images, a global batch of 32 (2 processes x 16, or 1 x 16 accumulated twice): 16 steps an epoch,
# 32 in all, a checkpoint every 4 steps; the moving average on, so that it is carried across too.
WORLDS = ["--config", "configs/debug.yaml", "data.limit_train=512", "data.limit_test=64", "data.global_batch=32",
          "data.batch_size=16", "train.epochs=2", "train.ema.decay=0.9", "checkpoint.every_steps=4",
          "train.log_every_steps=2"]
KILL_AT = 20        # epoch 1, 4 of its 16 steps done


@pytest.fixture(scope="module")
def two(baseline):
    """The uninterrupted 2-process run (1 accumulation step)."""
    return baseline(*WORLDS, procs=2)


@pytest.fixture(scope="module")
def one(baseline):
    """The uninterrupted 1-process run (2 accumulation steps)."""
    return baseline(*WORLDS)


def ema_weights(folder) -> dict:
    return load_file(os.path.join(folder, "model-ema.safetensors"))


def assert_same_training(resumed, reference):
    """Final weights and moving average within 1e-5 (fp32; the all-reduce sums in another order than one process
    does), and the same logged global losses after the resume step."""
    assert max_diff(load_file(resumed / "model.safetensors"), load_file(reference / "model.safetensors")) <= 1e-5
    assert max_diff(ema_weights(resumed), ema_weights(reference)) <= 1e-5
    after = [(r["step"], r["train/loss"]) for r in read_jsonl(resumed / "metrics.jsonl")
             if "train/loss" in r and r["step"] > KILL_AT]
    ref = [(r["step"], r["train/loss"]) for r in read_jsonl(reference / "metrics.jsonl")
           if "train/loss" in r and r["step"] > KILL_AT]
    assert [s for s, _ in after] == [s for s, _ in ref] == list(range(KILL_AT + 2, 33, 2))
    assert [loss for _, loss in after] == pytest.approx([loss for _, loss in ref], abs=1e-5)
    epoch = [r for r in read_jsonl(resumed / "metrics.jsonl") if "train/epoch_loss" in r][-1]
    ref_epoch = [r for r in read_jsonl(reference / "metrics.jsonl") if "train/epoch_loss" in r][-1]
    assert epoch["train/epoch_loss"] == pytest.approx(ref_epoch["train/epoch_loss"], abs=1e-5)   # the sums carried


def killed(tmp_path, procs) -> os.PathLike:
    """The WORLDS run on `procs` processes, SIGKILLed right after its mid-epoch save at step KILL_AT."""
    out = tmp_path / "run"
    proc = run("train.py", *WORLDS, f"output_dir={out}", procs=procs, check=False,
               CIFAR_FAULT=f"kill-after-save:{KILL_AT}")
    assert proc.returncode != 0 and max(steps_of(out)) == KILL_AT, proc.stderr[-3000:]
    assert not (out / "model.safetensors").exists()
    return out


@pytest.mark.slow
def test_killed_on_two_processes_resumed_on_one_ends_as_the_uninterrupted_two_process_run(tmp_path, two, caplog):
    """The same command on 1 process: train.grad_accum_steps goes from 1 to 2 by itself (data.global_batch), each
    rank-0 state is restored, the data continues at the same sample of epoch 1, and the weights, the moving average
    and the losses are those of the uninterrupted 2-process run.

    Checked that it fails: with train_epoch's skip counted in micro-batches of the saving run's world size
    (samples_in_epoch // (batch_size x 2)), the resumed run trained again on images already seen and the weights
    differed by 3e-3; with the moving average not restored (Checkpoints.load skipping _load_ema), the average
    differed by 6e-3."""
    out = killed(tmp_path, procs=2)
    saved = read_json(out / "checkpoints" / f"step-{KILL_AT}" / "state.json")
    assert saved["state"]["world_size"] == 2 and saved["state"]["global_batch"] == 32
    assert saved["config"]["train"]["grad_accum_steps"] == 1
    with caplog.at_level("INFO", logger="cifar"):
        train_here(*WORLDS, f"output_dir={out}")                  # 1 process: this one
    assert f"resuming at step {KILL_AT}, saved by 2 process(es), on 1" in caplog.text, caplog.text[-3000:]
    assert_same_training(out, two)
    # the record: the accumulation each step had, the world size that trained the end
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "config_changes" in r]
    assert rows == [{"step": KILL_AT, "config_changes": {"train.grad_accum_steps": {"from": 1, "to": 2}}}]
    summary = read_json(out / "summary.json")
    assert summary["world_size"] == 1 and summary["global_batch_size"] == 32
    assert summary["config_changes"] == [{"step": KILL_AT, "key": "train.grad_accum_steps", "from": 1, "to": 2}]
    assert load_config(str(out / "config.yaml")).train.grad_accum_steps == 2
    final = read_json(out / "checkpoints" / "step-32" / "state.json")["state"]
    assert final["world_size"] == 1 and final["global_batch"] == 32


@pytest.mark.slow
def test_killed_on_one_process_resumed_on_two_ends_as_the_uninterrupted_runs(tmp_path, one, two):
    """The reverse: killed on 1 process (2 accumulation steps), resumed on 2 (1): the weights, moving average and
    losses of the uninterrupted 1-process run, and so of the 2-process one.

    Checked that it fails: this test found that a resume in epoch 1 or later on several processes (the DataLoader
    path) replayed epoch 0's order: Accelerate's skipping loader over a sharded one does not pass set_epoch on to
    the sampler (fixed in DataLoaderBatches.epoch); without that fix the weights differ by 4e-3."""
    out = killed(tmp_path, procs=1)
    done = run("train.py", *WORLDS, f"output_dir={out}", procs=2)
    assert f"checkpoints/step-{KILL_AT}" in done.stdout and "saved by 1 process(es), on 2" in done.stdout
    assert_same_training(out, one)
    assert_same_training(out, two)
    assert read_json(out / "summary.json")["world_size"] == 2
    assert load_config(str(out / "config.yaml")).train.grad_accum_steps == 1


# ----------------------------------------------------------------------------- in this process

def test_global_batch_derives_the_accumulation_and_the_record_says_so(tmp_path):
    """data.global_batch=64 with batch 16 on 1 process trains as batch 64 does (grad_accum_steps 4), and its
    config.yaml and summary say so.

    Checked that it fails: with fit returning the config unchanged, the run took 4 times the steps."""
    args = ["--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=32", "train.epochs=1",
            "data.loader=device"]
    train_here(*args, "data.global_batch=64", "data.batch_size=16", f"output_dir={tmp_path}/acc")
    train_here(*args, "data.batch_size=64", f"output_dir={tmp_path}/big")
    assert max_diff(load_file(tmp_path / "acc" / "model.safetensors"),
                    load_file(tmp_path / "big" / "model.safetensors")) <= 1e-5
    saved = load_config(str(tmp_path / "acc" / "config.yaml"))
    assert (saved.data.global_batch, saved.data.batch_size, saved.train.grad_accum_steps) == (64, 16, 4)
    summary = read_json(tmp_path / "acc" / "summary.json")
    assert summary["global_batch_size"] == 64 and summary["steps"] == 4


def test_a_partial_last_window_is_dropped_on_the_device_path(tmp_path):
    """88 images on the device path: batch 8 accumulated twice is 11 micro-batches, whose last would make a short
    window of its own; it is dropped as batch 16 drops its partial batch, so both take 5 steps an epoch and end with
    the same weights (and so would 2 processes of 8: the same steps, the same images).

    Checked that it fails: with DeviceBatches.__len__ counting micro-batches only (the rule before), the
    accumulated run took 6 steps an epoch and its weights differed."""
    args = ["--config", "configs/debug.yaml", "data.limit_train=88", "data.limit_test=32", "train.epochs=2",
            "data.loader=device", "train.log_every_steps=1", "optim.lr=0.05"]
    train_here(*args, "data.batch_size=16", f"output_dir={tmp_path}/big")
    train_here(*args, "data.batch_size=8", "train.grad_accum_steps=2", f"output_dir={tmp_path}/acc")
    assert read_json(tmp_path / "acc" / "summary.json")["steps"] == read_json(tmp_path / "big" / "summary.json")[
        "steps"] == 10
    assert max_diff(load_file(tmp_path / "acc" / "model.safetensors"),
                    load_file(tmp_path / "big" / "model.safetensors")) <= 1e-5


def test_the_device_path_counts_whole_windows():
    """88 images in micro-batches of 8 accumulated twice: 10 micro-batches (5 windows), not 11; a window larger than
    the training set is refused naming it."""
    one = SimpleNamespace(device=torch.device("cpu"), process_index=0, num_processes=1)
    assert len(DeviceBatches(one, synthetic_split(88, True), DataConfig(batch_size=8), True, seed=0, accum=2)) == 10
    assert len(DeviceBatches(one, synthetic_split(88, True), DataConfig(batch_size=8), True, seed=0)) == 11
    with pytest.raises(UserError, match="data.batch_size 8 x 1 process.es. x 2 accumulated = 16 images per step, "
                                        "more than the training set's 15"):
        DeviceBatches(one, synthetic_split(15, True), DataConfig(batch_size=8), True, seed=0, accum=2)


def test_a_global_batch_that_does_not_split_is_one_line_naming_the_sizes_that_would(capsys, tmp_path):
    line = refusal(capsys, "train.py", "--config", "configs/debug.yaml", "data.global_batch=48", "data.batch_size=32",
                   f"output_dir={tmp_path}/run")
    assert ("data.global_batch=48 cannot be kept on 1 process(es) with data.batch_size=32: 48 is not a multiple of "
            "32 x 1; it is kept on 1 process(es) with data.batch_size=24, 16, 12, 8, 6, 4, 3 or 2") in line
    assert not (tmp_path / "run").exists()


def test_fit_names_the_process_counts_and_batch_sizes_that_keep_the_global_batch():
    cfg = load_config("configs/debug.yaml", ["data.global_batch=64", "data.batch_size=16"])
    assert [fit(cfg, w).train.grad_accum_steps for w in (1, 2, 4)] == [4, 2, 1]
    assert cfg.train.grad_accum_steps == 1                              # a copy: the caller's config is left alone
    with pytest.raises(UserError, match=r"cannot be kept on 3 process\(es\) with data.batch_size=16: 64 is not a "
                                        r"multiple of 16 x 3; it is kept on 1, 2 or 4 process\(es\) with "
                                        r"data.batch_size=16$"):
        fit(cfg, 3)
    with pytest.raises(UserError, match=r"on 8 process\(es\) with data.batch_size=8, 4, 2 or 1$"):
        fit(cfg, 8)
    contradicting = load_config("configs/debug.yaml", ["data.global_batch=64", "data.batch_size=16",
                                                       "train.grad_accum_steps=3"])
    with pytest.raises(UserError, match="train.grad_accum_steps=3 contradicts data.global_batch=64, which with "
                                        r"data.batch_size=16 on 2 process\(es\) needs 2; leave train.grad_accum_steps "
                                        "out"):
        fit(contradicting, 2)
    assert fit(load_config("configs/debug.yaml", ["data.global_batch=64", "data.batch_size=16",
                                                  "train.grad_accum_steps=2"]), 2).train.grad_accum_steps == 2
    assert process_counts(512, 64) == [1, 2, 4, 8] and process_counts(48, 32) == []


def test_rng_mapping():
    """Rank r restores saved rank r's states on the same world size, saved rank r mod the saved world size's on
    another (docs/distributed.md); Checkpoints.load follows it below."""
    assert [rng_source(r, 2) for r in range(2)] == [0, 1]
    assert [rng_source(r, 2) for r in range(4)] == [0, 1, 0, 1]
    assert [rng_source(r, 4) for r in range(2)] == [0, 1]
    assert [rng_source(r, 1) for r in range(3)] == [0, 0, 0]


@pytest.fixture(scope="module")
def accumulated(tmp_path_factory):
    """A finished 1-process run of global batch 32 (16 x 2 accumulated), 8 steps, a checkpoint at 4 and 8."""
    out = tmp_path_factory.mktemp("accumulated") / "run"
    train_here("--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=32", "train.epochs=1",
               "data.global_batch=32", "data.batch_size=16", "checkpoint.every_steps=4", "train.max_steps=8",
               f"output_dir={out}")
    return out


def test_a_checkpoint_resumed_with_another_global_batch_is_refused_naming_the_fix(accumulated, tmp_path, capsys):
    """Without data.global_batch, batch 16 on 1 process is a global batch of 16: refused in one line that names
    data.global_batch=32 and where it is kept; the folder is left byte for byte as it was."""
    copy = tmp_path / "run"
    shutil.copytree(accumulated, copy)
    before = snapshot(copy)
    base = ["--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=32", "train.epochs=1",
            "train.max_steps=16", f"output_dir={copy}"]
    line = refusal(capsys, "train.py", *base, "data.batch_size=16")
    assert (f"checkpoint {copy}/checkpoints/step-8 was trained with a global batch of 32, this run has 16 (saved by "
            f"1 process(es) x data.batch_size 16 x train.grad_accum_steps 2; now 1 process(es) x data.batch_size 16 x "
            f"train.grad_accum_steps 1); resume with data.global_batch=32 (train.grad_accum_steps then follows the "
            f"number of processes: it is kept on 1 or 2 process(es) with data.batch_size=16") in line
    line = refusal(capsys, "train.py", *base, "data.batch_size=16", "data.global_batch=64")
    assert "was trained with a global batch of 32, this run has 64" in line and "resume with data.global_batch=32" in line
    line = refusal(capsys, "train.py", *base, "data.batch_size=24", "data.global_batch=32")
    assert "data.global_batch=32 cannot be kept on 1 process(es) with data.batch_size=24" in line
    assert snapshot(copy) == before
    # given data.global_batch (and so the same global batch), it continues: the key's arrival is recorded
    train_here(*base, "data.batch_size=8", "data.global_batch=32")
    changes = read_json(copy / "summary.json")["config_changes"]
    assert {(c["key"], c["from"], c["to"]) for c in changes} == {("train.grad_accum_steps", 2, 4),
                                                                 ("data.batch_size", 16, 8), ("train.max_steps", 8, 16)}


def test_a_finished_run_requeued_on_another_split_of_its_global_batch_does_nothing(accumulated, tmp_path, caplog):
    """A finished run's command on another number of processes (here: another split, batch 8 accumulated 4 times)
    has nothing left to train: one line, exit 0, no file touched, as on the same number.

    Checked that it fails: with vet's finished check on an empty diff only (as before), the rerun rewrote
    summary.json and metrics.jsonl with a config change."""
    copy = tmp_path / "run"
    shutil.copytree(accumulated, copy)
    before = snapshot(copy)
    with caplog.at_level("INFO", logger="cifar"):
        train_here("--config", "configs/debug.yaml", "data.limit_train=256", "data.limit_test=32", "train.epochs=1",
                   "data.global_batch=32", "data.batch_size=8", "checkpoint.every_steps=4", "train.max_steps=8",
                   f"output_dir={copy}")
    assert "already finished (step 8); nothing to do" in caplog.text
    assert snapshot(copy) == before


def test_each_rank_of_another_world_size_restores_the_states_of_saved_rank_r_mod_the_saved_number(accumulated,
                                                                                                tmp_path):
    """A checkpoint holding two ranks' (different) RNG states, loaded by ranks 0..3 of 4 processes: rank r ends with
    saved rank r mod 2's torch state.

    Checked that it fails: with Checkpoints.load restoring rank 0's states everywhere, ranks 1 and 3 got the wrong
    one; with the rule before (only ranks below the saved number restore any), ranks 2 and 3 kept their own."""
    copy = tmp_path / "step-8"
    shutil.copytree(accumulated / "checkpoints" / "step-8", copy)
    training = torch.load(copy / "training.pt", weights_only=True)
    saved = []
    with torch.random.fork_rng():
        for seed in (1, 2):
            torch.manual_seed(seed)
            saved.append(torch.get_rng_state())
        training["rng"] = [dict(training["rng"][0], torch=state) for state in saved]
        torch.save(training, copy / "training.pt")
        cfg = load_config(str(copy / "config.yaml"))
        for rank in range(4):
            torch.manual_seed(100 + rank)                         # this process's own state, before the load
            model = model_from_config(cfg.model, 10)
            optimizer = build_optimizer(cfg.optim, model, {})
            accelerator = SimpleNamespace(is_main_process=True, scaler=None, process_index=rank, num_processes=4)
            Checkpoints(str(tmp_path), cfg, accelerator, model=model, optimizer=optimizer,
                        scheduler=build_scheduler(cfg.schedule, optimizer, 8), total_steps=8, epochs=1).load(str(copy))
            assert torch.equal(torch.get_rng_state(), saved[rank % 2]), rank
