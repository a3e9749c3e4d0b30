"""Schedules are counted in optimizer steps and end exactly at their end value, accumulation or not."""
import os

import pytest
from conftest import ROOT, read_jsonl
from inprocess import train_here

from cifar.config import load_config
from cifar.schedule import lr_factor

# Where each schedule ends, by hand from its definition (not the code's own table): constant stays at the base lr,
# the others fall to 0 on the last step
END = {"constant": 1.0, "cosine": 0.0, "onecycle": 0.0, "linear": 0.0}


@pytest.mark.parametrize("name", ["constant", "cosine", "onecycle", "linear"])
@pytest.mark.parametrize("total, warmup", [(10, 0), (10, 3), (1, 0), (2, 5), (1000, 100)])
def test_last_step_is_the_end_value(name, total, warmup):
    factors = [lr_factor(name, s, total, warmup) for s in range(total)]
    assert factors[-1] == pytest.approx(END[name]) or total == 1
    assert all(0 <= f <= 1 for f in factors)


def test_warmup_rises_then_cosine_falls():
    f = [lr_factor("cosine", s, 20, 5) for s in range(20)]
    assert f[:6] == sorted(f[:6]) and f[5] == 1.0
    assert f[5:] == sorted(f[5:], reverse=True) and f[-1] == 0.0


@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_run_with_accumulation_ends_on_the_schedule_end(tmp_path, schedule):
    # 200 synthetic images, micro-batch 16 -> 13 micro-batches per epoch, windows of 3 -> 5 optimizer steps/epoch
    out = tmp_path / "r"
    train_here("--config", "configs/debug.yaml", "data.limit_train=200", "data.batch_size=16",
               "train.grad_accum_steps=3", "train.epochs=3", "train.log_every_steps=1", f"schedule.name={schedule}",
               "schedule.warmup_steps=2", f"output_dir={out}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 16))
    assert rows[-1]["lr"] == 0.0
    peak = load_config(os.path.join(ROOT, "configs", "debug.yaml")).optim.lr     # the recipe's, reached after warmup
    assert rows[1]["lr"] > rows[0]["lr"] and max(r["lr"] for r in rows) == pytest.approx(peak)


def test_max_steps_sizes_the_schedule(tmp_path):
    out = tmp_path / "r"
    train_here("--config", "configs/debug.yaml", "train.max_steps=10", "train.log_every_steps=1", f"output_dir={out}")
    rows = [r for r in read_jsonl(out / "metrics.jsonl") if "train/loss" in r]
    assert [r["step"] for r in rows] == list(range(1, 11)) and rows[-1]["lr"] == 0.0
