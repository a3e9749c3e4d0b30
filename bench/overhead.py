"""Engine overhead: the engine's whole training loop vs a bare PyTorch loop on the same network, batches,
optimizer, schedule and threads.

    python bench/overhead.py [--threads 1] [--repeats 3] --config configs/debug.yaml [key=value ...]

The engine's time per step is summary.json's train_seconds / steps (its loop with logging, metric sums, signal
checks, epoch ends; evaluation excluded). The bare loop is zero_grad / forward / loss / backward / step / schedule
over the same `epoch()` batches. Best of --repeats, interleaved. Targets: <= 5% (core), <= 3% (fast path).
"""
import contextlib
import io
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from cifar.config import load_config  # noqa: E402
from cifar.data import build_batches, num_classes  # noqa: E402
from cifar.engine import train  # noqa: E402
from cifar.models import model_from_config  # noqa: E402
from cifar.optim import build_optimizer  # noqa: E402
from cifar.schedule import build_scheduler  # noqa: E402
from common import parser  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bare(cfg, steps: int) -> float:
    acc = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(cfg.seed)
    batches, _ = build_batches(acc, cfg.data, cfg.seed)
    model = model_from_config(cfg.model, num_classes(cfg.data))
    if hasattr(model, "init_from_data"):
        model.init_from_data(batches.first_images(5000).cpu())
    model = model.to(acc.device)
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg.optim, model)
    sched = build_scheduler(cfg.schedule, opt, steps)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    precision = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.mixed_precision)
    autocast = (lambda: torch.autocast(acc.device.type, dtype=precision)) if precision else contextlib.nullcontext
    model.train()
    sync()
    start, step, epoch = time.perf_counter(), 0, 0
    while step < steps:
        for images, labels in batches.epoch(epoch):
            if cfg.train.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = loss_fn(model(images).float(), labels)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
        epoch += 1
    sync()
    return (time.perf_counter() - start) / steps


def engine(config: str, overrides: list[str]) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config(config, [*overrides, f"output_dir={out}", "wandb.mode=disabled"])
        with contextlib.redirect_stdout(io.StringIO()):
            summary = train(cfg)
    return summary["train_seconds"] / summary["steps"], summary["steps"]


def main():
    ap = parser(__doc__, "configs/debug.yaml")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args, overrides = ap.parse_known_args()
    overrides = [o for o in overrides if o != "--"]
    torch.set_num_threads(args.threads)
    cfg = load_config(args.config, overrides)
    e, b = [], []
    for _ in range(args.repeats):                     # interleaved, best of N: robust to a busy machine
        seconds, steps = engine(args.config, overrides)
        e.append(seconds)
        b.append(bare(cfg, steps))
    te, tb = min(e) * 1e3, min(b) * 1e3
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {args.threads} thread(s)"
    print(f"{args.config} {' '.join(overrides)} | model={cfg.model.name} batch={cfg.data.batch_size} "
          f"loader={cfg.data.loader} steps={steps} | {device}")
    print(f"bare loop : {tb:.3f} ms/step")
    print(f"engine    : {te:.3f} ms/step")
    print(f"overhead  : {100 * (te / tb - 1):+.1f}%")


if __name__ == "__main__":
    main()
