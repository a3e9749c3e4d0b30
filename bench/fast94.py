"""Time-to-target of a recipe over several seeds: mean and spread of accuracy, training time and time to target.

    python bench/fast94.py --seeds 5 [--config configs/fast94.yaml] [--launch "accelerate launch ..."] [key=value ...]

Each seed is a real `train.py` run (its own process, so compile warm-up and data loading are measured as the
engine reports them, apart from training time). Writes bench/results/<name>.json and prints a table.
"""
import json
import os
import shlex
import statistics
import subprocess
import sys
import time

from common import ROOT, parser


def main():
    ap = parser(__doc__)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--launch", default=f"{sys.executable}", help="the command before train.py")
    ap.add_argument("--name", default=None, help="results name (default: the recipe's)")
    args, overrides = ap.parse_known_args()
    name = args.name or os.path.splitext(os.path.basename(args.config))[0]
    out_root = os.path.join(ROOT, "bench", "results", f"{name}-{time.strftime('%Y%m%d-%H%M%S')}")
    runs = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        out = os.path.join(out_root, f"seed{seed}")
        cmd = [*shlex.split(args.launch), os.path.join(ROOT, "train.py"), "--config", args.config, *overrides,
               f"seed={seed}", f"output_dir={out}", "checkpoint.every_epochs=null", "checkpoint.keep_last=1"]
        print("$", " ".join(cmd), flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            sys.exit(f"seed {seed} failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(out, "summary.json")) as f:
            s = json.load(f)
        runs.append(s)
        print(f"seed {seed}: acc {s['final_test_acc']:.2f}%  train {s['train_seconds']:.2f}s  "
              f"eval {s['eval_seconds']:.2f}s  to target {s['time_to_target']}  compile {s['compile_seconds']:.1f}s  "
              f"data {s['data_seconds']:.2f}s  mfu {s['mfu']}", flush=True)

    def stats(key):
        values = [r[key] for r in runs if r[key] is not None]
        if not values:
            return None
        return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values), "n": len(values)}

    report = {"config": args.config, "overrides": overrides, "launch": args.launch, "seeds": args.seeds,
              "device": runs[0]["device"], "world_size": runs[0]["world_size"],
              "precision": runs[0]["mixed_precision"], "tta": runs[0]["tta"], "target_acc": runs[0]["target_acc"],
              "reached_target": sum(r["time_to_target"] is not None for r in runs),
              **{k: stats(k) for k in ("final_test_acc", "train_seconds", "eval_seconds", "time_to_target",
                                       "compile_seconds", "data_seconds", "mfu", "images_per_sec")},
              "first_compile_seconds": runs[0]["compile_seconds"], "runs": runs}
    os.makedirs(out_root, exist_ok=True)
    with open(os.path.join(out_root, "report.json"), "w") as f:
        json.dump(report, f, indent=1)
    acc, tr = report["final_test_acc"], report["train_seconds"]
    print(f"\n{name}: {args.seeds} seeds on {report['device']} x{report['world_size']} ({report['precision']}, "
          f"TTA {report['tta']})")
    print(f"  test accuracy  {acc['mean']:.2f} ± {acc['std']:.2f} %  (min {acc['min']:.2f}, max {acc['max']:.2f})")
    print(f"  train seconds  {tr['mean']:.2f} ± {tr['std']:.2f}  (evaluation apart: "
          f"{report['eval_seconds']['mean']:.2f})")
    ttt = report["time_to_target"]
    print(f"  time to {report['target_acc']}%  " + (f"{ttt['mean']:.2f} ± {ttt['std']:.2f} s "
          f"({report['reached_target']}/{args.seeds} reached)" if ttt else "not reached"))
    print(f"  compile        first run {report['first_compile_seconds']:.1f}s")
    print(f"  report         {os.path.join(out_root, 'report.json')}")


if __name__ == "__main__":
    main()
