"""What a rank's training batches are, epochs 0 and 3: batches_of(overrides) in the test's own process (one
process), or this file run as a script, alone or under `accelerate launch`, writing each rank's to
<folder>/rank<r>.pt, so that test_fast_path.py and test_equivalence.py can compare layouts. Not a test itself."""
import sys

import torch
from accelerate import Accelerator, PartialState

from cifar.config import load_config
from cifar.data import build_batches


def batches_of(overrides) -> dict:
    """{epoch: [(images, labels), ...]} of this process's training batches, synthetic data on the device path
    unless the overrides say otherwise."""
    cfg = load_config(None, ["data.source=synthetic", "data.loader=device", "data.augment=true", *overrides])
    train, _ = build_batches(Accelerator(cpu=True), cfg.data, cfg.seed)
    return {e: [(x.clone(), y.clone()) for x, y in train.epoch(e)] for e in (0, 3)}


if __name__ == "__main__":
    out, *overrides = sys.argv[1:]
    epochs = batches_of(overrides)
    torch.save(epochs, f"{out}/rank{PartialState().process_index}.pt")
