"""evaluate.py's work (`cifar-evaluate`): a trained run's weights (cifar/trained.py) evaluated exactly, the
tutorial's report printed, eval.json and two PNGs written, and a W&B eval run when it is on. Its twin for a
person's own images is cifar/predict_cli.py."""
from __future__ import annotations

import argparse
import json
import os

from . import log, precedence
from .config_help import help_text
from .data import build_batches
from .errors import cli, exit_as_command
from .evaluation import evaluate
from .files import write_atomic
from .outputs import to_json
from .plots import confusion_png, predictions_png
from .run_folder import CONFUSION_PNG, EMA_WEIGHTS, EVAL, PREDICTIONS_PNG, SUMMARY, is_state_dict_file
from .runtime import make_accelerator, shut_down
from .tracking import Tracker, run_info
from .trained import add_run_arguments, bare_state_dict_note, load_trained


def trained_run(weights: str) -> tuple[str | None, int | None]:
    """(W&B run id, global step) of the training that produced these weights, when it says."""
    folder = os.path.dirname(weights)
    for name, pick in (("state.json", lambda d: d["state"]), (SUMMARY, lambda d: d)):
        try:
            with open(os.path.join(folder, name)) as f:
                record = pick(json.load(f))
            return record.get("wandb_run_id"), record.get("step", record.get("steps"))
        except (OSError, ValueError, KeyError):
            continue
    return None, None


def evaluate_run(checkpoint: str, overrides: list[str], tta: str, output_dir: str | None,
                 preview: int = 16, pick: str = "auto", into_train_run: bool = False) -> dict:
    """Exact accuracy on the test split, a report and two PNGs, and, when W&B is on, an eval run (job_type eval,
    in the recipe's group) or, with into_train_run, the training run itself."""
    cfg, model, weights = load_trained(checkpoint, overrides, pick)
    # the launcher's precision and the WANDB_* variables, over the run's saved config as over a recipe
    cfg = precedence.applied(cfg, overrides, "evaluate.py", base="the run's saved config", compiles=False)
    bare = is_state_dict_file(weights)
    accelerator = make_accelerator(cfg)
    _, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    model = accelerator.prepare(model)
    result = evaluate(model, test_batches, accelerator, tta=tta, samples=preview, top_k=cfg.train.top_k)
    run_id, step = (None, None) if bare else trained_run(weights)
    images, labels, preds = result.samples or (None, [], [])   # None: no test image on this rank
    ema = os.path.basename(weights) == EMA_WEIGHTS
    report = {"checkpoint": weights, "weights": "ema" if ema else "trained", "step": step, "tta": tta,
              "world_size": accelerator.num_processes, "mixed_precision": cfg.train.mixed_precision,
              "model": cfg.model.name, "normalize": cfg.data.normalize, "dataset": cfg.data.dataset,
              "accuracy": result.accuracy, "loss": result.loss, "count": result.count, "top_k": result.top_k,
              **result.top_k_entry("accuracy"),
              "per_class": result.per_class, "confusion": result.confusion,
              # the images predictions.png shows: the main process's first ones, test images 0, w, 2w, ... of its
              # shard (w processes), so that a single image's prediction can be checked against predict.py
              "samples": [{"index": i * accelerator.num_processes, "label": label, "predicted": pred}
                          for i, (label, pred) in enumerate(zip(labels, preds))]}
    if accelerator.is_main_process:
        out = output_dir or os.path.dirname(weights)
        os.makedirs(out, exist_ok=True)
        if bare:
            print(bare_state_dict_note(cfg, weights))
        if ema:
            print(f"the moving average of the weights (train.ema), {weights}")
        print(per_class_report(result.count, result.accuracy, result.per_class))
        write_atomic(os.path.join(out, EVAL), (to_json(report) + "\n").encode())
        name = os.path.basename(weights) if bare else cfg.name + (" (moving average)" if ema else "")
        title = f"{name}: {result.accuracy:.2f}% on {result.count} test images" + (
            f" ({tta} TTA)" if tta != "none" else "")
        classes = list(result.per_class)
        confusion_png(result.confusion, os.path.join(out, CONFUSION_PNG), title, classes)
        predictions_png(images, labels, preds, os.path.join(out, PREDICTIONS_PNG), classes=classes)
        print(f"wrote {out}/{EVAL}, {CONFUSION_PNG}, {PREDICTIONS_PNG}")
        report["output_dir"] = out

        tracker = Tracker.start(cfg, output_dir=out, enabled=True, job_type="eval",
                                run_id=run_id if into_train_run else None, extra=run_info(cfg, accelerator))
        prefix = "eval/" if tta == "none" else f"eval_{tta}/"
        tracker.log({"step": step or 0, **result.as_row(prefix), f"{prefix}checkpoint": weights})
        tracker.log_eval(step or 0, result.confusion, images, labels, preds, classes=classes)
        tracker.summary({f"{prefix}acc": result.accuracy, f"{prefix}loss": result.loss,
                         **result.top_k_entry(f"{prefix}acc")})
        tracker.finish(0)
    shut_down(accelerator)
    return report


LIST_ALL_UP_TO = 20     # classes; above, the report shows the best and worst TOP_K (eval.json has them all)
TOP_K = 10


def per_class_report(count: int, accuracy: float, per_class: dict[str, float]) -> str:
    """The tutorial's lines: overall accuracy, then each class's; with more than LIST_ALL_UP_TO classes
    (CIFAR-100), the TOP_K best and the TOP_K worst classes instead of all of them."""
    lines = [f"Accuracy of the network on the {count} test images: {accuracy:.2f} %"]
    if len(per_class) <= LIST_ALL_UP_TO:
        return "\n".join(lines + [f"Accuracy of {name:>5s} : {acc:5.1f} %" for name, acc in per_class.items()])
    ranked = sorted(per_class.items(), key=lambda kv: -kv[1])      # stable: ties keep label order
    width = max(map(len, per_class))
    for what, rows in ((f"best {TOP_K}", ranked[:TOP_K]), (f"worst {TOP_K}", ranked[-TOP_K:][::-1])):
        lines.append(f"The {what} of {len(per_class)} classes (all in eval.json):")
        lines += [f"Accuracy of {name:>{width}s} : {acc:5.1f} %" for name, acc in rows]
    return "\n".join(lines)


USAGE = """Evaluate a trained run: overall and per-class accuracy, confusion matrix, a grid of predictions.

    python evaluate.py --checkpoint runs/<run> [--pick best] [--tta] [--output DIR] [data.root=/datasets/cifar ...]
    python evaluate.py --checkpoint cifar_net.pth     # the tutorial's torch.save(net.state_dict(), PATH)
    accelerate launch --multi_gpu --num_processes 2 evaluate.py --checkpoint runs/<run>
"""


@cli
def main(argv=None):
    parser = argparse.ArgumentParser(description=USAGE, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The run's saved config applies; section.key=value overrides it (data.root "
                                            "for another copy of the data, data.eval_batch_size...).\n\n" + help_text())
    add_run_arguments(parser)
    parser.add_argument("--tta", nargs="?", const="flip", default="none", choices=["none", "flip", "flip_translate"],
                        help="test-time augmentation: average the image with its mirror (flip, the default when "
                             "given alone), and one-pixel shifts of both (flip_translate)")
    parser.add_argument("--output", help="where eval.json and the PNGs go (default: beside the weights)")
    parser.add_argument("--wandb-into-train-run", action="store_true",
                        help="with W&B on (wandb.mode=online|offline), log into the training run instead of a new "
                             "eval run")
    parser.add_argument("--log-level", choices=log.LEVELS,
                        help="debug | info (default) | warning | error; or $CIFAR_LOG_LEVEL")
    args, overrides = parser.parse_known_args(argv)
    log.setup(args.log_level)
    evaluate_run(args.checkpoint, overrides, args.tta, args.output, pick=args.pick,
                 into_train_run=args.wandb_into_train_run)


def command() -> None:
    """The `cifar-evaluate` console script: main(), then the process exits with its status (a rank of a multi-process
    run without interpreter finalization: errors.exit_as_command)."""
    exit_as_command(main)


if __name__ == "__main__":
    exit_as_command(main)
