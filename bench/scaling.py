"""Training throughput (images/s of the training loop) with 1 and 2 processes (or --procs ...) on this machine.

    python bench/scaling.py [--procs 1 2] [--config configs/fast94.yaml] [key=value ...]

Per-process batch stays the same, so the global batch grows with the processes (weak scaling). On a CPU the
processes split the cores (OMP_NUM_THREADS = cores / processes); on GPUs each process takes one GPU.
"""
import os
import sys

import torch

from common import parser, train


def main():
    ap = parser(__doc__)
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args, overrides = ap.parse_known_args()
    cpu = not torch.cuda.is_available()
    rows = []
    for n in args.procs:
        env = dict(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, os.cpu_count() // n))) if cpu else {}
        launch = [sys.executable] if n == 1 else [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        s, _ = train(["--config", args.config, *overrides, "checkpoint.every_epochs=null"], launch, env)
        rows.append((n, s["images_per_sec"], s["global_batch_size"]))
        print(f"{n} process(es): {s['images_per_sec']:.0f} images/s (global batch {s['global_batch_size']})",
              flush=True)
    base = rows[0][1]
    for n, ips, _ in rows[1:]:
        print(f"speed-up x{ips / base:.2f} with {n} processes (efficiency {100 * ips / base / n:.0f}%)")


if __name__ == "__main__":
    main()
