"""Who decides a setting, resolved once before the run starts and written into the Config itself, so that
config.yaml, summary.json and W&B record what was really used:

    a key on train.py's command line  >  the launcher (accelerate launch's --mixed_precision, --dynamo_backend,
    --dynamo_mode, its config file, their ACCELERATE_* variables) and W&B's WANDB_* variables  >  the recipe

    cfg, notes = resolve(cfg, given_keys(overrides), os.environ)    # notes: one line per value the user set that lost

evaluate.py resolves its run's saved config the same way (applied(..., "evaluate.py", compiles=False)).

`accelerate launch` exports ACCELERATE_MIXED_PRECISION=no and ACCELERATE_DYNAMO_BACKEND=NO also when it was given
nothing, so the variable alone cannot say whether the user asked. The rule: a value other than accelerate's default
(no / NO / default) was chosen by someone (the flag, `accelerate config`'s file, or the variable exported by the
user) and counts. accelerate's default counts only when it is not the launcher's default: the variable was set
without `accelerate launch`, or the `accelerate launch` that started this process (its command line, read from
/proc) was given the flag. When that cannot be told (no /proc), it does not count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import typing

import torch

from . import log
from .config import Config, TrainConfig, flatten, parse_overrides
from .errors import UserError, shorten
from .tracking import resolve_mode

# Every accelerate launcher (simple, multi-GPU, DeepSpeed, ...) exports this one; a user has no reason to.
LAUNCHED = "ACCELERATE_DYNAMO_USE_REGIONAL_COMPILATION"
PRECISIONS = typing.get_args(typing.get_type_hints(TrainConfig)["mixed_precision"])
COMPILE_MODES = typing.get_args(typing.get_type_hints(TrainConfig)["compile_mode"])
# WANDB_* variable -> its wandb.* key (WANDB_MODE is read as tracking.resolve_mode reads it)
WANDB_VARIABLES = {"WANDB_PROJECT": "project", "WANDB_ENTITY": "entity", "WANDB_RUN_GROUP": "group",
                   "WANDB_NAME": "name", "WANDB_JOB_TYPE": "job_type", "WANDB_TAGS": "tags", "WANDB_NOTES": "notes",
                   "WANDB_MODE": "mode"}


def given_keys(overrides: list[str]) -> set[str]:
    """The dotted config keys train.py's command line sets (a whole section given as `train={...}` sets each of its
    keys)."""
    keys = set()
    for key, value in parse_overrides(overrides):
        keys.update(f"{key}.{k}" for k in flatten(value, ".")) if isinstance(value, dict) else keys.add(key)
    return keys


def launcher_options(environ=os.environ, parent: int | None = None) -> set[str] | None:
    """The options (`mixed_precision`, `dynamo_backend`, ...) given on the command line of the `accelerate launch`
    that started this process; None when no accelerate launcher started it; an empty set when its command line
    cannot be read."""
    if LAUNCHED not in environ:
        return None
    try:
        with open(f"/proc/{parent or os.getppid()}/cmdline", "rb") as f:
            argv = f.read(1 << 16).decode(errors="replace").split("\0")
    except OSError:
        return set()
    start = next((i + 1 for i, a in enumerate(argv) if a == "launch" or a.endswith("accelerate.commands.launch")),
                 None)
    if start is None:
        return set()
    from accelerate.commands.launch import launch_command_parser   # only under accelerate launch: it is slow
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            script = launch_command_parser().parse_known_args(argv[start:])[0].training_script
    except SystemExit:
        return set()
    options = argv[start:argv.index(script, start)] if script in argv[start:] else []
    return {a[2:].split("=")[0].replace("-", "_") for a in options if a.startswith("--")}


def resolve(cfg: Config, given: set[str], environ=os.environ, parent: int | None = None, command: str = "train.py",
            base: str = "the recipe", compiles: bool = True) -> tuple[Config, list[str]]:
    """cfg with the launcher's and W&B's variables applied where the command line did not set the key; and one
    line for each value the user set that is not the one used. A launcher value this trainer cannot run is a
    UserError naming it. parent: the launcher's process id (default this process's parent). command and base name
    the command line and what it starts from in the lines (evaluate.py: the run's saved config); compiles=False for
    a command that compiles nothing (evaluate.py), whose launcher's dynamo settings are then not the config's."""
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train), wandb=dataclasses.replace(cfg.wandb))
    notes: list[str] = []
    options = launcher_options(environ, parent)
    chose = _chooser(cfg, given, notes, command, base)

    precision = environ.get("ACCELERATE_MIXED_PRECISION", "").strip().lower()
    if _asked(precision, "no", "mixed_precision", options):
        where = _launcher("ACCELERATE_MIXED_PRECISION", "--mixed_precision", precision, options)
        if "train.mixed_precision" not in given:
            _runnable(precision, where)
        chose("train.mixed_precision", precision, where)
    backend = environ.get("ACCELERATE_DYNAMO_BACKEND", "").strip().lower() if compiles else ""
    if _asked(backend, "no", "dynamo_backend", options):
        where = _launcher("ACCELERATE_DYNAMO_BACKEND", "--dynamo_backend", backend, options)
        if backend not in ("no", "inductor") and "train.compile" not in given:
            raise UserError(f"{where}: this trainer compiles with inductor (train.compile=true) or not at all; "
                            f"launch with --dynamo_backend inductor or no, or set train.compile on train.py's "
                            f"command line")
        chose("train.compile", backend == "inductor", where)
    mode = environ.get("ACCELERATE_DYNAMO_MODE", "").strip() if compiles else ""
    if _asked(mode, "default", "dynamo_mode", options):
        where = _launcher("ACCELERATE_DYNAMO_MODE", "--dynamo_mode", mode, options)
        if mode not in COMPILE_MODES and "train.compile_mode" not in given:
            raise UserError(f"{where}: not a torch.compile mode this trainer runs ({', '.join(COMPILE_MODES)}); "
                            f"launch with one of them")
        chose("train.compile_mode", mode, where)

    for variable, key in WANDB_VARIABLES.items():
        text = environ.get(variable, "").strip()
        if not text:
            continue
        if key == "mode":    # a null wandb.mode already follows $WANDB_MODE (tracking.resolve_mode) and stays null
            value, problem = resolve_mode(None, {variable: text})
            if problem or cfg.wandb.mode is None:    # an unusable value: the tracker says so when it starts
                continue
        elif key == "tags":
            value = [t.strip() for t in text.split(",") if t.strip()]
        else:
            value = text
        chose(f"wandb.{key}", value, f"${variable}={_shown(text)}")

    notes.extend(process_count(environ))
    return cfg, notes


def applied(cfg: Config, overrides: list[str], command: str = "train.py", **kw) -> Config:
    """resolve() for a command's config and its command line's overrides, its lines said once, by the first
    process (every rank resolves the same)."""
    cfg, notes = resolve(cfg, given_keys(overrides), os.environ, command=command, **kw)
    for note in notes if os.environ.get("RANK", "0") == "0" else ():
        log.warning(note)
    return cfg


def process_count(environ=os.environ) -> list[str]:
    """A line when accelerate launch was asked for several processes (it sets MASTER_PORT then) but started this
    one alone (no WORLD_SIZE): without --multi_gpu its simple launcher runs the script once, on CPU silently."""
    if LAUNCHED in environ and "MASTER_PORT" in environ and "WORLD_SIZE" not in environ:
        return ["accelerate launch was asked for several processes (--num_processes/--num_machines) but started "
                "this one alone: without --multi_gpu it runs the script once; add --multi_gpu (DDP, over gloo on "
                "CPU) to train on several"]
    return []


def _asked(value: str, default: str, option: str, options: set[str] | None) -> bool:
    """Whether the launcher's value was chosen by someone (see the module's docstring)."""
    if not value:
        return False
    return value != default or options is None or option in options


def _launcher(variable: str, flag: str, value: str, options: set[str] | None) -> str:
    if options is None:
        return f"${variable}={_shown(value)}"
    return f"the launcher's {value} (accelerate launch {flag}, its config file or ${variable})"


def _runnable(precision: str, where: str) -> None:
    """The launcher's precision, when this machine cannot train with it: one line saying why."""
    if precision not in PRECISIONS:
        raise UserError(f"{where}: mixed precision {shorten(precision)} is not one this trainer runs "
                        f"({', '.join(PRECISIONS)}); launch with one of them")
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError(f"{where}: fp16 autocast needs a CUDA GPU and this machine has none; launch with "
                        f"--mixed_precision bf16 (CPU autocast) or no")
    if precision == "bf16" and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        raise UserError(f"{where}: this GPU does not support bf16; launch with --mixed_precision fp16 or no")


def _chooser(cfg: Config, given: set[str], notes: list[str], command: str, base: str):
    """set(key, value, where): the value from `where` unless the command line set the key; a note when a value
    someone set loses."""
    def choose(key: str, value, where: str) -> None:
        section, name = key.split(".")
        node = getattr(cfg, section)
        current = getattr(node, name)
        if current == value:
            return
        if key in given:
            notes.append(f"{key}={_shown(current)} from {command}'s command line wins over {where}")
            return
        setattr(node, name, value)
        if current is not None and current != []:       # a value replaced (a null or empty one says nothing)
            notes.append(f"{key}={_shown(value)} from {where} wins over {base}'s {_shown(current)}; set {key} on "
                         f"{command}'s command line to choose")
    return choose


def _shown(value) -> str:
    """A value as an override writes it: true, null, a,b; a long string cut (errors.shorten)."""
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, list):
        return ",".join(map(_shown, value))
    return shorten(value) if isinstance(value, str) and len(value) > 80 else str(value)
