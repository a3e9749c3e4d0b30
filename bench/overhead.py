"""Engine overhead: one optimizer step through cifar.engine.train_step vs a bare PyTorch loop.

Same model, same batches (already in memory, so data loading is out of the picture), same threads.
    python bench/overhead.py [--model tutorial_net] [--batch 4] [--steps 3000] [--threads 1]
Prints ms/step for both and the engine's overhead in percent (target: at most 5%).
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from accelerate import Accelerator  # noqa: E402

from cifar.engine import train_step  # noqa: E402
from cifar.models import build_model  # noqa: E402
from cifar.schedule import lr_factor  # noqa: E402


def batches(n, batch):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g))
            for _ in range(n)]


def bare(model_name, data, steps):
    torch.manual_seed(0)
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor("cosine", s, steps, 0))
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        sched.step()
    return time.perf_counter() - start


def engine(model_name, data, steps):
    torch.manual_seed(0)
    acc = Accelerator(cpu=not torch.cuda.is_available())
    model = build_model(model_name)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt.optimizer, lambda s: lr_factor("cosine", s, steps, 0))
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum")
    data = [(x.to(acc.device), y.to(acc.device)) for x, y in data]
    model.train()
    start = time.perf_counter()
    for i in range(steps):
        train_step(acc, model, opt, loss_fn, [data[i % len(data)]], None)
        if not acc.optimizer_step_was_skipped:
            sched.step()
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tutorial_net")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    data = batches(64, args.batch)
    bare(args.model, data, min(200, args.steps))      # warm-up both paths
    engine(args.model, data, min(200, args.steps))
    b, e = [], []
    for _ in range(args.repeats):                     # interleaved, best of N: robust to a busy machine
        b.append(bare(args.model, data, args.steps))
        e.append(engine(args.model, data, args.steps))
    tb, te = min(b) / args.steps * 1e3, min(e) / args.steps * 1e3
    print(f"model={args.model} batch={args.batch} threads={args.threads} steps={args.steps}")
    print(f"bare loop : {tb:.3f} ms/step")
    print(f"engine    : {te:.3f} ms/step")
    print(f"overhead  : {100 * (te / tb - 1):+.1f}%")


if __name__ == "__main__":
    main()
