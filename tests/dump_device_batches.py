"""Helper run by test_fast_path.py (alone or under `accelerate launch`): writes what each rank's device-resident
loader yields, so the test can compare layouts. Not a test itself."""
import sys

import torch
from accelerate import Accelerator

from cifar.config import load_config
from cifar.data import build_batches

out, *overrides = sys.argv[1:]
cfg = load_config(None, ["data.source=synthetic", "data.loader=device", "data.augment=true", *overrides])
acc = Accelerator(cpu=True)
train, _ = build_batches(acc, cfg.data, cfg.seed)
epochs = {e: [(x.clone(), y.clone()) for x, y in train.epoch(e)] for e in (0, 3)}
torch.save(epochs, f"{out}/rank{acc.process_index}.pt")
