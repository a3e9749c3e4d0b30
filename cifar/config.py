"""Typed run configuration: dataclasses filled from YAML recipes and dotted command-line overrides.

A recipe may extend another with `base: other.yaml` (relative to the recipe's folder). Overrides look like
`optim.lr=0.1` (or `--optim.lr 0.1`); values are parsed as YAML. Anything unknown, mistyped or out of range is
refused with a UserError naming the key, before any work starts.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import yaml

from . import yaml_io
from .augment import POLICIES, build_policy
from .errors import UserError, shorten
from .models import MODELS, check_name
from .nested import flatten
from .optim import OPTIMIZERS
from .schedule import SCHEDULES
from .shipped import recipe_path


@dataclass
class ModelConfig:
    # a name in cifar/models.py's registry, torchvision:<name> (any torchvision.models classifier), timm:<name>
    # (pip install -e ".[timm]"), or <module>:<callable>: your own (docs/extending.md)
    name: str = "tutorial_net"
    # torchvision's ResNets (resnet*, resnext*, wide_resnet*): a 3x3 stride-1 stem conv and no max-pool instead of
    # the ImageNet stem (7x7 stride-2 conv and max-pool), which would shrink a 32x32 image to 8x8 at once
    cifar_stem: bool = False
    # fastnet: train the whitening conv's bias for the first N epochs only, its lr falling to 0 by then, and freeze
    # it after: the backward pass then stops at the first block (3.8% of a step's FLOPs). null: train it throughout.
    whiten_bias_epochs: Optional[int] = None
    # fine-tuning: start from these weights (a run folder, a checkpoint folder, a .safetensors or .pth/.pt file),
    # weights only: a new optimizer and schedule, step 0. Tensors whose shape differs (the head, CIFAR-10 -> CIFAR-100)
    # keep their new initialisation, listed in one line. A resumed run takes its checkpoint's weights instead.
    init_from: Optional[str] = None
    # backbone: train only the head (the last nn.Linear); the rest is left out of the optimizer and its BatchNorm
    # statistics are kept (eval mode) (docs/checkpoints.md, fine-tuning)
    freeze: Literal["none", "backbone"] = "none"


@dataclass
class DataConfig:
    # cifar10 (CIFAR-10's 10 classes) | cifar100 (CIFAR-100's 100 fine classes): the files, the classes, every
    # model's head
    dataset: Literal["cifar10", "cifar100"] = "cifar10"
    # cifar10 or files (the same): data.dataset's files under root, whichever dataset that is | synthetic: random
    # CIFAR-shaped images of data.dataset's classes, no download
    source: Literal["cifar10", "files", "synthetic"] = "cifar10"
    root: str = "./data"                     # the folder holding cifar-10-batches-py/ (cifar100: cifar-100-python/)
    download: bool = True                    # fetch the official archive (MD5-checked) when root lacks it
    batch_size: int = 4                      # per process
    # images per optimizer step over all processes, kept on any number of them: train.grad_accum_steps follows it
    # (global_batch / (batch_size x processes); a train.grad_accum_steps other than 1 must agree). null: off
    global_batch: Optional[int] = None
    eval_batch_size: Optional[int] = None    # per process; default max(batch_size, 256)
    augment: bool = False                    # random crop and horizontal flip of the training images
    num_workers: int = 2                     # DataLoader worker processes (the dataloader path)
    limit_train: Optional[int] = None        # first N training images (synthetic: the set's size)
    limit_test: Optional[int] = None         # first N test images
    loader: Literal["dataloader", "device"] = "dataloader"   # device: the whole split on the GPU (fast path)
    crop_padding: int = 4                    # random crop of 32 from the image padded by this many pixels
    pad_mode: Literal["zeros", "reflect"] = "zeros"   # reflect: mirror about the edge, no black borders
    alternating_flip: bool = False           # flip each image in every other epoch instead of at random
    # Input normalisation, on every path and in evaluate/predict/export: the tutorial's (0.5, 0.5, 0.5) /
    # (0.5, 0.5, 0.5), or CIFAR-10's per-channel mean/std. Weights only score as trained with their own.
    normalize: Literal["cifar", "tutorial"] = "tutorial"
    # a per-image augmentation after crop and flip: autoaugment (torchvision's CIFAR-10 policy), randaugment,
    # trivialaugment (TrivialAugment Wide), or <module>:<callable>: your own (docs/extending.md); dataloader path only
    policy: str = "none"
    # random erasing: the probability that an image gets one rectangle (2-33% of it, aspect 0.3-3.3: torchvision's
    # RandomErasing) set to 0 after normalisation (the mean pixel); 0: off. Both loaders, batched on the device
    erasing: float = 0.0
    # Cutout: a square of this many pixels (16 for CIFAR-10) centred anywhere, set to 0 after normalisation; 0: off
    cutout: int = 0
    # MixUp: each image blended with its neighbour in the batch (the same pair, whatever the processes), the
    # targets alike, lambda ~ Beta(alpha, alpha) (0.2-1); 0: off. Needs an even data.batch_size
    mixup_alpha: float = 0.0
    # CutMix: a box of the neighbour pasted in, of area 1 - lambda, lambda ~ Beta(alpha, alpha) (1.0); 0: off. With
    # mixup_alpha as well, each pair gets one of the two at random
    cutmix_alpha: float = 0.0


@dataclass
class OptimConfig:
    # muon: Muon on conv filters, Nesterov SGD on the rest; or <module>:<callable>: your own (docs/extending.md)
    name: str = "sgd"
    lr: float = 0.001                        # muon: the conv filters' lr
    momentum: float = 0.9                    # muon: of the SGD part
    nesterov: bool = False                   # Nesterov momentum (sgd, muon)
    weight_decay: float = 0.0                # L2 for sgd and muon, decoupled for adamw
    bias_lr: Optional[float] = None          # muon: lr of biases and norms (default lr)
    head_lr: Optional[float] = None          # muon: lr of 2-D weights such as the classifier (default lr)
    muon_momentum: float = 0.6               # muon: momentum of the orthogonalised updates
    # false: no weight decay on norm and bias parameters (those of fewer than 2 dimensions, or named *.bias), as
    # timm and most modern recipes; true (the default): decay on every parameter, as every recipe here was trained
    decay_norm_bias: bool = True


@dataclass
class ScheduleConfig:
    # the lr over the optimizer steps; or <module>:<callable>: your own (docs/extending.md)
    name: str = "constant"
    warmup_steps: int = 0                    # optimizer steps


@dataclass
class EmaConfig:
    # an exponential moving average of the weights, evaluated beside them (test/ema_acc) and saved as
    # model-ema.safetensors; null: off. 0.999 averages over about the last 1,000 updates
    decay: Optional[float] = None
    every_steps: int = 1                     # fold the weights in every N optimizer steps


@dataclass
class TrainConfig:
    epochs: int = 2                          # passes over the training set
    max_steps: Optional[int] = None          # optimizer steps; overrides epochs when set
    grad_accum_steps: int = 1                # micro-batches per optimizer step (global batch x this)
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"   # autocast on the GPU (bf16 on recent GPUs)
    grad_clip: Optional[float] = None        # clip the gradients' global norm to this
    label_smoothing: float = 0.0             # of the cross-entropy targets
    eval_every_epochs: int = 1               # evaluate on the test set every N epochs (and after the last)
    log_every_steps: int = 50                # a metrics.jsonl / W&B row every N optimizer steps
    tta: Literal["none", "flip", "flip_translate"] = "none"   # test-time augmentation of the evaluations
    target_acc: Optional[float] = None       # summary.json reports the time and step it is first reached
    # every evaluation also counts top-k accuracy (test/acc_top5: the label among the k highest logits); null: off
    top_k: Optional[int] = 5
    compile: bool = False                    # torch.compile the model (warm-up timed apart from training)
    # torch.compile's mode; reduce-overhead records CUDA graphs (one launch per forward/backward: small nets on a
    # fast GPU are otherwise bound by kernel launches). Several processes compile with default (see engine).
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"
    channels_last: bool = False              # NHWC memory format (faster convolutions on recent GPUs)
    # CPU runs: malloc keeps freed memory for the next step instead of page-faulting it in again (perf.py)
    keep_freed_memory: bool = True
    ema: EmaConfig = field(default_factory=EmaConfig)
    # trace N optimizer steps (after one warm-up step) with torch.profiler into <run>/profile/ (Perfetto,
    # TensorBoard); main process only; null: off
    profile: Optional[int] = None
    # GPU: cuDNN's benchmark off and torch.use_deterministic_algorithms (an op without a deterministic kernel warns,
    # naming itself); CPU runs are bitwise reproducible already: there it only fills new tensors
    deterministic: bool = False


@dataclass
class CheckpointConfig:
    every_steps: Optional[int] = None        # also save every N optimizer steps
    every_epochs: Optional[int] = 1          # save at the end of every N epochs
    keep_last: int = 2                       # newest checkpoints kept
    keep_best: int = 1                       # best by test accuracy, kept besides the newest
    resume: str = "auto"                     # auto | never | <path to a checkpoint or run folder>
    overwrite: bool = False                  # with resume: never, start over in a folder with checkpoints
                                             # (its earlier files are moved into previous-<time>/)


@dataclass
class WandbConfig:
    mode: Optional[Literal["online", "offline", "disabled"]] = None   # null: $WANDB_MODE, else online under
                                                                      # `wandb agent`, else disabled
    project: str = "cifar10"                 # W&B project of the run
    entity: Optional[str] = None             # W&B team or user (default: your default entity)
    name: Optional[str] = None               # default: the run folder's name
    group: Optional[str] = None              # default: the recipe name (a sweep's runs: the sweep)
    tags: list[str] = field(default_factory=list)   # W&B tags (a sweep adds its parameters as key=value)
    job_type: str = "train"                  # W&B job type (evaluate.py's runs: eval)
    notes: Optional[str] = None              # W&B notes, a line about the run
    # checkpoints as W&B model artifacts model-<run id>: best (each new best, alias best), final (the final
    # weights, alias final), all (every checkpoint, alias step-N, and the final weights); false: none
    log_model: Literal["false", "best", "final", "all"] = "false"


@dataclass
class Config:
    name: str = "tutorial"                   # the recipe's name: run folder prefix, default W&B group
    seed: int = 0                            # model init, data order and augmentation
    output_dir: Optional[str] = None         # default runs/<name>-<timestamp>
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------- loading

def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    """Recipe file (or the defaults) + overrides -> validated Config."""
    return _with_overrides(_read_recipe(recipe_path(path), seen=()) if path else {}, overrides)


def config_loader(path: str | None) -> typing.Callable[[list[str]], Config]:
    """load_config(path, overrides) for many lists of overrides, the recipe read once (a sweep's runs)."""
    raw = _read_recipe(recipe_path(path), seen=()) if path else {}
    return lambda overrides: _with_overrides(copy.deepcopy(raw), overrides)


# A saved config (a run's or a checkpoint's config.yaml) lacks the keys added after it was written; these are what
# its training used, where that differs from today's default: every run before data.normalize existed was normalised
# with the CIFAR statistics, while the default is now the tutorial's.
# Every run before data.dataset existed was CIFAR-10 (its default too, said here so that a change of default would
# not change what old runs were).
# Every run before model.cifar_stem existed had its network's own stem.
SAVED_DEFAULTS = {"data": {"normalize": "cifar", "dataset": "cifar10"}, "model": {"cifar_stem": False}}
# Every run before model.freeze existed trained all of its parameters.
SAVED_DEFAULTS.setdefault("model", {})["freeze"] = "none"
# ... and decayed every parameter (optim.decay_norm_bias), and chose its GPU kernels by speed (train.deterministic).
SAVED_DEFAULTS.setdefault("optim", {})["decay_norm_bias"] = True
SAVED_DEFAULTS.setdefault("train", {})["deterministic"] = False


def registry_choices() -> dict[str, list[str]]:
    """The names registered now (a user's @register too) for the keys a registry holds (cifar/registry.py), and
    the other forms its module resolves (torchvision:<name>): `--help` lists them. <module>:<callable>, which every
    registry takes, is in each key's comment."""
    return {registry.key: [*registry, *registry.forms] for registry in (MODELS, OPTIMIZERS, SCHEDULES, POLICIES)}


def with_saved_defaults(saved: dict) -> dict:
    """A saved config (a dict) with the keys it predates filled in as SAVED_DEFAULTS."""
    return _merge(SAVED_DEFAULTS, saved)


def load_saved_config(path: str, overrides: list[str] = ()) -> Config:
    """A run's saved config.yaml + overrides -> validated Config, keys it predates read as SAVED_DEFAULTS."""
    return _with_overrides(with_saved_defaults(_read_recipe(path, seen=())), overrides)


def _with_overrides(raw: dict, overrides: list[str]) -> Config:
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value)
    cfg = _build(Config, raw, prefix="")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> Config:
    """Rebuild a Config saved in a run folder (config.yaml); keys it predates read as SAVED_DEFAULTS."""
    return _with_overrides(with_saved_defaults(dict(raw)), [])


def parse_overrides(args: list[str]) -> list[tuple[str, Any]]:
    """`a.b=1`, `--a.b=1` and `--a.b 1` -> [("a.b", 1)]."""
    out, i = [], 0
    args = list(args)
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            arg = arg[2:]
            if "=" not in arg:
                if i + 1 >= len(args):
                    raise UserError(f"override {shorten('--' + arg)} has no value; write --KEY=VALUE, e.g. "
                                    f"--optim.lr=0.1")
                arg, i = f"{arg}={args[i + 1]}", i + 1
        if "=" not in arg or arg.startswith("="):
            raise UserError(f"cannot read override {shorten(args[i])}; write section.key=value, e.g. optim.lr=0.1")
        key, text = arg.split("=", 1)
        if key.count(".") >= yaml_io.MAX_DEPTH:  # each part is a level of nested sections
            raise UserError(f"override key {shorten(key)} has {key.count('.') + 1:,} parts; config keys have a few, "
                            f"e.g. optim.lr")
        try:
            value = yaml_io.safe_load(text, f"override {shorten(key)}", yaml_io.VALUE_CHARS) if text != "" else ""
        except yaml.YAMLError:
            value = text  # not YAML: keep the plain string, type checks still apply
        if text == "None":  # `wandb agent` writes Python's None for a null parameter (f"{key}={value}")
            value = None
        out.append((key.strip(), value))
        i += 1
    return out


def _read_recipe(path: str, seen: tuple) -> dict:
    path = os.path.abspath(path)
    if path in seen:
        raise UserError(f"recipe {path} extends itself through 'base'; remove the cycle")
    try:
        with open(path) as f:
            raw = yaml_io.safe_load(f, f"config file {path}") or {}
    except FileNotFoundError:
        raise UserError(f"config file {path} not found; pass an existing recipe, e.g. --config configs/debug.yaml")
    except IsADirectoryError:
        raise UserError(f"config {path} is a folder; pass a recipe file in it, e.g. --config configs/debug.yaml")
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not a text (YAML) file; pass a recipe, e.g. configs/debug.yaml")
    except OSError as e:
        raise UserError(f"cannot read config file {path} ({e.strerror}); check its permissions, or pass another")
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        where = f" at line {line + 1}" if line is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}; fix the syntax")
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must be a mapping of sections, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise UserError(f"'base' in {path} must be a file name, e.g. base: tutorial.yaml")
    parent = _read_recipe(os.path.join(os.path.dirname(path), base), seen + (path,))
    return _merge(parent, raw)


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _set_dotted(raw: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise UserError(f"override {shorten(key)}: {shorten('.'.join(parts[:i + 1]))} is a value, not a section")
        node = child
    if isinstance(value, dict) and isinstance(node.get(parts[-1]), dict):
        # a section given whole (`optim={lr: 0.1}`, as `wandb agent` passes nested sweep parameters) sets those
        # keys and keeps the recipe's others
        node[parts[-1]] = _merge(node[parts[-1]], value)
    else:
        node[parts[-1]] = value


# ----------------------------------------------------------------------------- typing

def _build(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a section (mapping), got "
                        f"{shorten(raw)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise UserError(f"unknown config key {shorten(f'{prefix}{key}')}; allowed here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in raw:
            kwargs[name] = _coerce(hints[name], raw[name], prefix + name)
    return cls(**kwargs)


def _coerce(tp, value, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value if value is not None else {}, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is Literal:
        if value is False:  # YAML 1.1 reads a bare `no` (mixed_precision) or `false` (log_model) as false
            value = "no" if "no" in args else "false"
        if value not in args:
            raise UserError(f"config key '{key}' must be one of {', '.join(map(str, args))}; got {shorten(value)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, key) for v in value]
    if tp is bool:
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' must be true or false; got {shorten(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"config key '{key}' must be an integer; got {shorten(value)}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string; people write it all the time
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"config key '{key}' must be a number; got {shorten(value)}")
        return float(value)
    if tp is str:
        if value is None or isinstance(value, (dict, list)):
            raise UserError(f"config key '{key}' must be a string; got {shorten(value)}")
        return str(value)
    raise TypeError(f"unsupported config type {tp} for {key}")  # a bug in this file, not user input


# ----------------------------------------------------------------------------- ranges

def _require(ok: bool, key: str, allowed: str, value) -> None:
    if not ok:
        raise UserError(f"config key '{key}' must be {allowed}; got {shorten(value)}")


# Every float key must be a number training can hold: float32's largest (an lr of 1e300, or 1e309 read as inf, would
# be inf in the first update).
_FLOAT_MAX = 3.4028234663852886e38
# numpy's seeds (set_seed seeds numpy, Python and torch alike) are 0 .. 2**32 - 1
_SEEDS = 2 ** 32


def validate(cfg: Config) -> None:
    for key, value in flatten(cfg.to_dict(), sep=".").items():
        _require(not isinstance(value, float) or abs(value) <= _FLOAT_MAX, key,
                 "a finite number of magnitude at most 3.4e38 (float32's largest)", value)
    _require(0 <= cfg.seed < _SEEDS, "seed", f"in 0..{_SEEDS - 1} (for a random seed, pick one: seed=$RANDOM; the "
             f"record then holds it)", cfg.seed)
    d, o, s, t = cfg.data, cfg.optim, cfg.schedule, cfg.train
    m = cfg.model
    check_name(m.name, m.cifar_stem)
    OPTIMIZERS.check(o.name)
    SCHEDULES.check(s.name)
    _require(m.whiten_bias_epochs is None or (m.name == "fastnet" and m.whiten_bias_epochs >= 1),
             "model.whiten_bias_epochs", ">= 1 with model.name=fastnet, or null", m.whiten_bias_epochs)
    _require(m.whiten_bias_epochs is None or m.freeze == "none", "model.whiten_bias_epochs",
             "null with model.freeze=backbone (the whitening bias is part of the frozen backbone)",
             m.whiten_bias_epochs)
    _require(m.init_from is None or m.init_from != "", "model.init_from", "a path, or null", m.init_from)
    _require(d.batch_size >= 1, "data.batch_size", ">= 1", d.batch_size)
    _require(d.global_batch is None or d.global_batch >= 1, "data.global_batch", ">= 1 or null", d.global_batch)
    _require(d.eval_batch_size is None or d.eval_batch_size >= 1, "data.eval_batch_size", ">= 1 or null",
             d.eval_batch_size)
    _require(d.num_workers >= 0, "data.num_workers", ">= 0", d.num_workers)
    _require(0 <= d.crop_padding <= 16, "data.crop_padding", "in 0..16", d.crop_padding)
    for k in ("limit_train", "limit_test"):
        v = getattr(d, k)
        _require(v is None or v >= 1, f"data.{k}", ">= 1 or null", v)
    build_policy(d)           # the name, and what its transform makes of an image: refused here, before any work
    _require(d.policy == "none" or d.loader == "dataloader", "data.policy", "none with data.loader=device (a "
             "policy runs per image in the DataLoader's workers; the device path batches crop, flip, erasing, "
             "cutout, MixUp and CutMix only): set data.loader=dataloader, or data.policy=none", d.policy)
    _require(0 <= d.erasing <= 1, "data.erasing", "a probability in [0, 1] (0: off)", d.erasing)
    _require(0 <= d.cutout <= 32, "data.cutout", "in 0..32 pixels (0: off; 16 is Cutout's CIFAR-10 size)", d.cutout)
    for k in ("mixup_alpha", "cutmix_alpha"):
        _require(getattr(d, k) >= 0, f"data.{k}", ">= 0 (0: off)", getattr(d, k))
    _require(not (d.mixup_alpha or d.cutmix_alpha) or d.batch_size % 2 == 0, "data.batch_size",
             "even with data.mixup_alpha or data.cutmix_alpha (images are mixed in pairs of neighbours, never across "
             "processes)", d.batch_size)
    _require(o.lr > 0, "optim.lr", "> 0", o.lr)
    _require(0 <= o.momentum < 1, "optim.momentum", "in [0, 1)", o.momentum)
    _require(o.weight_decay >= 0, "optim.weight_decay", ">= 0", o.weight_decay)
    _require(not o.nesterov or (o.name in ("sgd", "muon") and o.momentum > 0), "optim.nesterov",
             "false unless optim.name is sgd or muon with momentum > 0", o.nesterov)
    for k in ("bias_lr", "head_lr"):
        v = getattr(o, k)
        _require(v is None or v > 0, f"optim.{k}", "> 0 or null", v)
    _require(0 <= o.muon_momentum < 1, "optim.muon_momentum", "in [0, 1)", o.muon_momentum)
    _require(s.warmup_steps >= 0, "schedule.warmup_steps", ">= 0", s.warmup_steps)
    _require(t.epochs >= 1, "train.epochs", ">= 1", t.epochs)
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps", ">= 1 or null", t.max_steps)
    _require(t.grad_accum_steps >= 1, "train.grad_accum_steps", ">= 1", t.grad_accum_steps)
    _require(t.grad_clip is None or t.grad_clip > 0, "train.grad_clip", "> 0 or null", t.grad_clip)
    _require(0 <= t.label_smoothing < 1, "train.label_smoothing", "in [0, 1)", t.label_smoothing)
    _require(t.eval_every_epochs >= 1, "train.eval_every_epochs", ">= 1", t.eval_every_epochs)
    _require(t.log_every_steps >= 1, "train.log_every_steps", ">= 1", t.log_every_steps)
    _require(t.profile is None or t.profile >= 1, "train.profile", ">= 1 (optimizer steps to trace) or null",
             t.profile)
    _require(t.top_k is None or t.top_k >= 1, "train.top_k", ">= 1 (5: top-5 accuracy) or null", t.top_k)
    _require(t.ema.decay is None or 0 < t.ema.decay < 1, "train.ema.decay", "in (0, 1), or null (off)", t.ema.decay)
    _require(t.ema.every_steps >= 1, "train.ema.every_steps", ">= 1", t.ema.every_steps)
    c = cfg.checkpoint
    for k in ("every_steps", "every_epochs"):
        v = getattr(c, k)
        _require(v is None or v >= 1, f"checkpoint.{k}", ">= 1 or null", v)
    _require(c.keep_last >= 1, "checkpoint.keep_last", ">= 1 (the newest checkpoint is what resume needs)", c.keep_last)
    _require(c.keep_best >= 0, "checkpoint.keep_best", ">= 0", c.keep_best)
    _require(cfg.wandb.log_model != "best" or c.keep_best >= 1, "wandb.log_model",
             "false, final or all when checkpoint.keep_best is 0 (best follows the kept best checkpoint)",
             cfg.wandb.log_model)
    _require(bool(c.resume), "checkpoint.resume", "auto, never or a checkpoint path", c.resume)
