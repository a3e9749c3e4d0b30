"""CPU training with and without train.keep_freed_memory: ms per step and page faults per step of the engine.

    python bench/cpu_malloc.py [--repeats 3] [--config configs/fast94.yaml] [key=value ...]

Each run is a fresh `train.py` process (malloc settings are per process), alternating on/off, best of N. Page
faults are the child's minor faults over the whole run (data loading included) divided by its steps.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULTS = ["data.root=./data", "data.download=false", "data.limit_train=10000", "data.limit_test=2000",
            "train.epochs=2", "train.eval_every_epochs=2", "train.mixed_precision=no", "train.compile=false",
            "train.tta=none", "checkpoint.every_epochs=null"]


def one_run(config: str, overrides: list[str], keep: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as out:
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
        subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--config", config, *DEFAULTS, *overrides,
                        f"train.keep_freed_memory={str(keep).lower()}", f"output_dir={out}"],
                       cwd=ROOT, env=dict(os.environ, WANDB_MODE="disabled"), check=True, stdout=subprocess.DEVNULL)
        faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
    return 1e3 * s["train_seconds"] / s["steps"], faults / s["steps"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/fast94.yaml")
    ap.add_argument("--repeats", type=int, default=3)
    args, overrides = ap.parse_known_args()
    results = {True: [], False: []}
    for _ in range(args.repeats):
        for keep in (False, True):
            results[keep].append(one_run(args.config, overrides, keep))
            ms, faults = results[keep][-1]
            print(f"keep_freed_memory={keep!s:5}: {ms:8.1f} ms/step, {faults:9.0f} page faults/step", flush=True)
    best = {k: min(ms for ms, _ in v) for k, v in results.items()}
    print(f"best of {args.repeats}: off {best[False]:.1f} ms/step, on {best[True]:.1f} ms/step "
          f"({100 * (best[True] / best[False] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
