"""What the benchmark scripts share: the repository root, a short run on real data, and train.py as a subprocess."""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Two short epochs on 10,000 real images, fp32 eager, no checkpoints, one evaluation: step times, not accuracy.
SHORT_RUN = ["data.root=./data", "data.download=false", "data.limit_train=10000", "data.limit_test=2000",
             "train.epochs=2", "train.eval_every_epochs=2", "train.mixed_precision=no", "train.compile=false",
             "train.tta=none", "checkpoint.every_epochs=null"]


def parser(doc: str, config: str = "configs/fast94.yaml") -> argparse.ArgumentParser:
    """The scripts' command line: their docstring as help, --config, and key=value overrides left over."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=config)
    return ap


def train(args: list[str], launch: list[str] | None = None, env: dict | None = None, **kw) -> tuple[dict, list]:
    """Run train.py in a fresh process (W&B off) into a temporary run folder: (summary.json, metrics.jsonl rows)."""
    with tempfile.TemporaryDirectory() as out:
        subprocess.run([*(launch or [sys.executable]), os.path.join(ROOT, "train.py"), *args, f"output_dir={out}"],
                       cwd=ROOT, env={**os.environ, "WANDB_MODE": "disabled", **(env or {})}, check=True,
                       stdout=subprocess.DEVNULL, **kw)
        with open(os.path.join(out, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    return summary, rows
