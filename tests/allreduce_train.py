"""Run by test_equivalence.py instead of train.py (under `accelerate launch`): train.py, with DDP's gradient
all-reduces recorded through a communication hook that all-reduces as DDP's own does. Each rank writes
$ALLREDUCE_LOG/rank<r>.json: {"windows": the micro-batches of each optimizer step's window, "calls": one
[step, micro-batch] per bucket all-reduced, the micro-batch counted from 1 within its window}. Not a test itself."""
import atexit
import json
import os
import sys

from accelerate import Accelerator
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import train  # noqa: E402
from cifar import engine  # noqa: E402
from cifar.errors import exit_as_command  # noqa: E402

windows, calls = [], []
where = {"step": 0, "micro": 0}        # where the training loop is: its optimizer step, the micro-batch in it


def counted_allreduce(state, bucket):
    calls.append([where["step"], where["micro"]])
    return allreduce_hook(state, bucket)


def next_micro_batch(module, args):
    where["micro"] += 1


def prepare(self, *objects, _prepare=Accelerator.prepare, **kw):
    prepared = _prepare(self, *objects, **kw)
    for obj in prepared if isinstance(prepared, tuple) else (prepared,):
        if isinstance(obj, DistributedDataParallel):
            obj.register_comm_hook(None, counted_allreduce)        # None: the default process group
            obj.register_forward_pre_hook(next_micro_batch)         # the engine calls DDP once per micro-batch
    return prepared


def train_step(accelerator, model, optimizer, loss_fn, window, grad_clip, _train_step=engine.train_step):
    where["step"], where["micro"] = where["step"] + 1, 0
    windows.append(len(window))
    return _train_step(accelerator, model, optimizer, loss_fn, window, grad_clip)


def write_log():
    with open(os.path.join(os.environ["ALLREDUCE_LOG"], f"rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({"windows": windows, "calls": calls}, f)


if __name__ == "__main__":
    Accelerator.prepare, engine.train_step = prepare, train_step
    atexit.register(write_log)            # a rank's command ends without returning here (errors.exit_as_command)
    exit_as_command(train.main)
