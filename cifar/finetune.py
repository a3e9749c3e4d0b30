"""Fine-tuning: start a new run from another run's weights (model.init_from), optionally with the backbone frozen
(model.freeze=backbone).

Weights only, as timm's --initial-checkpoint and Lightning's load_from_checkpoint: the optimizer, the schedule and
the step start afresh. Every tensor whose name and shape fit is copied; the rest keep the new network's own
initialisation (the head, when CIFAR-10 weights start a CIFAR-100 run) and are listed in one line. The weights are
found and read as evaluate.py finds and reads them (run_folder.find_run_files: a run or checkpoint folder;
files.read_state_dict: a bare .pth/.pt state_dict, weights_only=True; or a .safetensors file), and refused in one
line when the path holds no weights or nothing fits.

The head is the network's last nn.Linear (models.head): every built-in model ends in one (tutorial_net's fc3,
resnet18's fc, fastnet's head), as do torchvision's and timm's classifiers. model.freeze=backbone trains only the
head: every other parameter is excluded from the optimizer, and the backbone's normalisation layers stay in eval
mode (their running statistics are part of what is frozen, as in a linear probe).
"""
from __future__ import annotations

import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import log
from .config import Config, ModelConfig, load_saved_config
from .errors import UserError, shorten
from .files import read_state_dict, sha256
from .models import head
from .registry import spelled
from .run_folder import CONFIG, find_run_files, is_state_dict_file

# A weights file larger than this is not a CIFAR network's (ViT-L/16, among the largest torchvision classifiers, is
# 1.2 GB): refused before it is read.
MAX_BYTES = 4 * 2**30
LISTED = 8          # names the line lists of each kind; the count says how many more


def weights_file(path: str) -> str:
    """The weights file model.init_from names: a run folder's final weights (else its latest checkpoint's), a
    checkpoint folder's, or the file itself (.safetensors, .pth, .pt)."""
    given = path
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(path):
        raise UserError(f"model.init_from={spelled(given)} does not exist; pass a run folder, a checkpoint folder, "
                        f"a .safetensors or a .pth/.pt file of weights")
    if os.path.isdir(path):
        return find_run_files(path)[1]
    if not (path.lower().endswith(".safetensors") or is_state_dict_file(path)):
        raise UserError(f"model.init_from={spelled(given)} is not a weights file (.safetensors, .pth or .pt) nor a "
                        f"run or checkpoint folder; pass one of those")
    return path


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """A weights file's tensors, by name, read without running anything from it; one line when it cannot be."""
    size = os.path.getsize(path)
    if size > MAX_BYTES:
        raise UserError(f"model.init_from: {path} is {size / 2**30:.1f} GiB, larger than any CIFAR network's weights "
                        f"({MAX_BYTES / 2**30:.0f} GiB at most); pass the weights of a network trained on CIFAR")
    if is_state_dict_file(path):
        return read_state_dict(path)           # weights_only=True: a file that needs more is refused
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"model.init_from: {path} cannot be read as weights ({shorten(reason)}): it is truncated, "
                        f"corrupt or not a safetensors file; pass another checkpoint of the run") from None


def source_model(weights: str) -> str | None:
    """model.name of the run that saved the weights, when its config.yaml lies beside them (for the refusal)."""
    config = os.path.join(os.path.dirname(weights), CONFIG)
    try:
        return load_saved_config(config).model.name if os.path.isfile(config) else None
    except UserError:
        return None


def _listed(items: list[str]) -> str:
    more = f" and {len(items) - LISTED} more" if len(items) > LISTED else ""
    return ", ".join(items[:LISTED]) + more


def init_from(model: torch.nn.Module, cfg: ModelConfig) -> dict:
    """Copy model.init_from's fitting tensors into the model (every rank does, before Accelerate prepares it); log
    one line saying what was loaded and what was not. Returns the run's record of it: the weights file, its SHA-256,
    and the tensors left as initialised (shape differs, missing from the file) or ignored (not in the model)."""
    path = weights_file(cfg.init_from)
    state = read_weights(path)
    own = model.state_dict()
    fits = {k: v for k, v in state.items() if k in own and tuple(v.shape) == tuple(own[k].shape)}
    reshaped = sorted(k for k in state.keys() & own.keys() if k not in fits)
    missing, unexpected = sorted(own.keys() - state.keys()), sorted(state.keys() - own.keys())
    if not fits:
        theirs = source_model(path)
        hint = f"pass model.name={theirs} as the run that saved them, or" if theirs else "pass"
        first = (f"{reshaped[0]}: {list(state[reshaped[0]].shape)} in the file, {list(own[reshaped[0]].shape)} here"
                 if reshaped else f"{sorted(state)[0]} is not a layer of it")
        raise UserError(f"model.init_from: no tensor of {path} fits model {cfg.name} (its {len(state)} tensors, first: "
                        f"{first}); {hint} weights of the same network")
    with torch.no_grad():
        for key, value in fits.items():
            own[key].copy_(value)          # state_dict tensors share the parameters' storage
    digest = sha256(path)
    parts = [f"model.init_from: {len(fits)} of {len(own)} tensors from {path} (sha256 {digest[:12]})"]
    if reshaped:
        parts.append("re-initialised, shape differs: " + _listed(
            [f"{k} {list(state[k].shape)} -> {list(own[k].shape)}" for k in reshaped]))
    if missing:
        parts.append("not in the file, initialised: " + _listed(missing))
    if unexpected:
        parts.append("in the file but not in the model, ignored: " + _listed(unexpected))
    log.info("; ".join(parts))
    return {"path": path, "sha256": digest, "loaded": len(fits), "reinitialised": reshaped, "missing": missing,
            "unexpected": unexpected}


def freeze_backbone(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """model.freeze=backbone: every parameter but the head's (the last nn.Linear) stops training; the optimizer,
    built over the parameters that train, never sees them."""
    if cfg.freeze == "none":
        return
    prefix, _ = head(model)
    if prefix is None:
        raise UserError(f"model.freeze=backbone trains only the head, the network's last nn.Linear, and model "
                        f"{cfg.name} has none; set model.freeze=none")
    for name, p in model.named_parameters():
        if not name.startswith(prefix + "."):
            p.requires_grad_(False)


def hold_frozen_norms(model: torch.nn.Module, cfg: ModelConfig) -> None:
    """After model.train(): with model.freeze=backbone, the backbone's normalisation layers back in eval mode, so
    that their running statistics stay the source's (a BatchNorm in training mode would update them)."""
    if cfg.freeze == "none":
        return
    prefix, _ = head(model)
    for name, module in model.named_modules():
        # the layers whose training mode changes their state: BatchNorm's (and InstanceNorm's, when it tracks
        # them) running statistics
        if getattr(module, "track_running_stats", False) and not name.startswith(prefix + "."):
            module.eval()


def prepare_model(model: torch.nn.Module, cfg: Config, resumed: bool) -> dict | None:
    """model.init_from and model.freeze on a freshly built model, before the optimizer is built. A resumed run
    (checkpoint.resume) takes its weights from the checkpoint: init_from is not applied again (None)."""
    record = init_from(model, cfg.model) if cfg.model.init_from and not resumed else None
    freeze_backbone(model, cfg.model)
    hold_frozen_norms(model, cfg.model)      # from the start: train.compile's warm-up compiles the graph it will run
    return record
