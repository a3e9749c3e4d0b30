"""evaluate.py's work: find a run's weights and config (or take a bare state_dict file, as the tutorial saves one),
evaluate them exactly, print the tutorial's report, write eval.json and two PNGs, and log to W&B when it is on.
predict.py and `python -m cifar.export` load their weights the same way (load_run)."""
from __future__ import annotations

import json
import os

from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Config, load_config, load_saved_config
from .data import DATASETS, build_batches, dataset_info, num_classes
from .errors import UserError
from .evaluation import evaluate
from .files import load_fitting, read_state_dict, write_atomic
from .models import MODELS, head, model_from_config
from .outputs import to_json
from .plots import confusion_png, predictions_png
# find_run_files, is_state_dict_file: run_folder's readers, which model.init_from (cifar/finetune.py) uses too
from .run_folder import (CONFUSION_PNG, EMA_WEIGHTS, EVAL, PREDICTIONS_PNG, SUMMARY, find_run_files,  # noqa: F401
                         is_state_dict_file)
from .runtime import make_accelerator, shut_down
from .tracking import Tracker, run_info


def add_run_arguments(parser) -> None:
    """--checkpoint and --pick, as evaluate.py, predict.py and python -m cifar.export all take them."""
    parser.add_argument("--checkpoint", required=True,
                        help="run folder, checkpoint folder (checkpoints/step-N), a model.safetensors, or a bare "
                             "state_dict file (.pth/.pt, taken as the tutorial's Net and normalisation unless "
                             "model.name=... data.normalize=... say otherwise)")
    parser.add_argument("--pick", choices=["auto", "final", "latest", "best", "ema"], default="auto",
                        help="in a run folder: final weights, latest or best checkpoint (auto: final if finished); "
                             "ema: the moving average of the weights (train.ema), final or else the latest")


def load_run_weights(model, weights: str, cfg: Config | None = None) -> None:
    """The weights into the model, or one line naming the file when it is truncated, corrupt, not safetensors
    (SafetensorError) or unreadable (OSError), or made for another network (or, cfg given, another dataset)."""
    try:
        state = load_file(weights)
        if cfg is not None:
            check_dataset(model, state, weights, cfg)
        load_fitting(model, state, weights, "use the run's own config or the right checkpoint")
    except (SafetensorError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"{weights} cannot be read as model weights ({reason}): the file is truncated, corrupt or "
                        f"not a safetensors file; evaluate another checkpoint of the run (a checkpoints/step-<N> "
                        f"folder, or --pick latest) or retrain") from None


def check_dataset(model, state: dict, weights: str, cfg: Config) -> None:
    """Refuse, in one line, weights whose classifier has another dataset's number of classes than data.dataset."""
    prefix, outputs = head(model)
    shape = getattr(state.get(f"{prefix}.weight"), "shape", None)
    if shape is None or len(shape) != 2 or shape[0] == outputs:
        return
    info = dataset_info(cfg.data)
    other = next((d for d in DATASETS.values() if d.num_classes == shape[0]), None)
    which = f" ({other.title}'s classes)" if other else ""
    fix = (f"pass data.dataset={other.name} to use it on {other.title}" if other else
           "these weights were not trained by this project on CIFAR-10 or CIFAR-100")
    raise UserError(f"{weights} holds a network with {shape[0]} outputs{which}, and data.dataset={info.name} asks "
                    f"for {info.title}'s {info.num_classes} classes; {fix}")


def check_saved_dataset(config_path: str, saved: Config, cfg: Config) -> None:
    """An override of data.dataset on a run of the other dataset is refused in one line naming both."""
    if saved.data.dataset == cfg.data.dataset:
        return
    was, asked = dataset_info(saved.data), dataset_info(cfg.data)
    raise UserError(f"the run of {config_path} was trained on {was.title} (data.dataset={was.name}, "
                    f"{was.num_classes} classes) and data.dataset={asked.name} asks for {asked.title}; drop the "
                    f"data.dataset override to evaluate it on {was.title}")


def load_run(checkpoint: str, overrides: list[str], pick: str = "auto"):
    """(config, model with its weights, weights path) for a run folder, a checkpoint, a model.safetensors, or a bare
    PyTorch state_dict file (.pth/.pt). A state_dict comes with no config: it is taken to be the tutorial's Net and
    preprocessing (the config's defaults), which overrides such as model.name=... data.normalize=... change."""
    if is_state_dict_file(checkpoint):
        weights = os.path.abspath(checkpoint)
        cfg = load_config(None, overrides)
        model = model_from_config(cfg.model, num_classes(cfg.data))
        state = read_state_dict(weights)
        check_dataset(model, state, weights, cfg)
        load_fitting(model, state, weights,
                     f"it holds a network of another shape than model.name={cfg.model.name}; for another of this "
                     f"project's networks pass model.name=NAME ({', '.join(MODELS)})")
        return cfg, model, weights
    config_path, weights = find_run_files(checkpoint, pick)
    cfg = load_saved_config(config_path, overrides)
    check_saved_dataset(config_path, load_saved_config(config_path), cfg)
    model = model_from_config(cfg.model, num_classes(cfg.data))
    load_run_weights(model, weights, cfg)
    return cfg, model, weights


def bare_state_dict_note(cfg: Config, weights: str) -> str:
    """What a bare state_dict was taken for, and how to say otherwise (its file says nothing of it)."""
    return (f"{os.path.basename(weights)}: a bare PyTorch state_dict, taken as model.name={cfg.model.name} with "
            f"data.normalize={cfg.data.normalize} (pass model.name=... data.normalize=... if it is another)")


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
    cfg, model, weights = load_run(checkpoint, overrides, pick)
    bare = is_state_dict_file(weights)
    accelerator = make_accelerator(cfg)
    _, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    model = accelerator.prepare(model)
    result = evaluate(model, test_batches, accelerator, tta=tta, samples=preview, top_k=cfg.train.top_k)
    run_id, step = (None, None) if bare else trained_run(weights)
    images, labels, preds = result.samples or (None, [], [])   # None: no test image on this rank
    ema = os.path.basename(weights) == EMA_WEIGHTS
    report = {"checkpoint": weights, "weights": "ema" if ema else "trained", "step": step, "tta": tta,
              "world_size": accelerator.num_processes,
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
