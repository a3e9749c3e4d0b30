"""Training throughput (images/s of the training loop) with 1 and 2 processes (or --procs ...) on this machine.

    python bench/scaling.py [--procs 1 2] [--config configs/fast94.yaml] [key=value ...]

Per-process batch stays the same, so the global batch grows with the processes (weak scaling). On a CPU the
processes split the cores (OMP_NUM_THREADS = cores / processes); on GPUs each process takes one GPU.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fast94.yaml")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    args, overrides = ap.parse_known_args()
    cpu = not _cuda()
    rows = []
    for n in args.procs:
        with tempfile.TemporaryDirectory() as out:
            env = dict(os.environ, WANDB_MODE="disabled")
            if cpu:
                env.update(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS=str(max(1, os.cpu_count() // n)))
            launch = [sys.executable] if n == 1 else [
                sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
            cmd = [*launch, os.path.join(ROOT, "train.py"), "--config", args.config, *overrides, f"output_dir={out}",
                   "checkpoint.every_epochs=null"]
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
            with open(os.path.join(out, "summary.json")) as f:
                s = json.load(f)
        rows.append((n, s["images_per_sec"], s["global_batch_size"]))
        print(f"{n} process(es): {s['images_per_sec']:.0f} images/s (global batch {s['global_batch_size']})",
              flush=True)
    base = rows[0][1]
    for n, ips, _ in rows[1:]:
        print(f"speed-up x{ips / base:.2f} with {n} processes (efficiency {100 * ips / base / n:.0f}%)")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
