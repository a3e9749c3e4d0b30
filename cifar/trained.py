"""A trained network for inference, as evaluate.py, predict.py and `python -m cifar.export` all take it: --checkpoint
(a run folder, a checkpoint, a model.safetensors, or a bare state_dict file as the tutorial saves one) and --pick
found, its config read and its weights loaded (load_trained)."""
from __future__ import annotations

import os

from safetensors import SafetensorError
from safetensors.torch import load_file

from .config import Config, load_config, load_saved_config
from .data import DATASETS, dataset_info, num_classes
from .errors import UserError
from .files import load_fitting, read_state_dict
from .models import MODELS, head, model_from_config
from .run_folder import find_run_files, is_state_dict_file


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


def load_trained(checkpoint: str, overrides: list[str], pick: str = "auto"):
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
