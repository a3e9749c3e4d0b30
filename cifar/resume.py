"""What resuming does with a config that differs from the checkpoint's, key by key, so that the run's record (config.yaml,
metrics.jsonl, summary.json, W&B) always says what was really trained:

- free (FREE below): where the run writes, reads and logs; applied silently.
- applied (APPLIED below): the lr, weight decay, schedule length, gradient clipping, the moving average, evaluation
  and speed settings can honestly change from the resume step on. Applied, one info line per key, and recorded:
  config.yaml holds the config in force, state.json and summary.json a `config_changes` list, metrics.jsonl a row at
  the resume step, so that config.yaml + metrics.jsonl say what each step was trained with.
- refused: everything else (optim.name, model.*, data.dataset, data.augment, seed, schedule.*, mixed_precision, ...)
  would make the steps before the checkpoint a run of another recipe: one line naming each key, old -> new, and the
  fix, before anything is loaded or written.

A rerun that finds its run finished with the same config does nothing (AlreadyFinished).
"""
from __future__ import annotations

import os

import yaml

from . import log
from .checkpoint import Checkpoints, TrainState, list_checkpoints, read_state, step_of, verify
from .config import Config, flatten, with_saved_defaults
from .errors import AlreadyFinished, UserError
from .run_folder import CHECKPOINTS, FINISHED, read_status, read_summary
from .worlds import alternatives

# Keys (and prefixes) that may change without changing what is trained: where the run writes, reads and logs.
FREE = ("output_dir", "checkpoint.", "wandb.", "data.root", "data.download", "data.num_workers",
        "data.eval_batch_size", "train.log_every_steps", "train.eval_every_epochs", "train.top_k", "train.profile")
# Keys (and prefixes) applied from the resume step on. data.batch_size and train.grad_accum_steps only split the same
# global batch differently (another number of processes): a changed global batch is refused before this list counts.
APPLIED = ("optim.lr", "optim.bias_lr", "optim.head_lr", "optim.weight_decay", "train.epochs", "train.max_steps",
           "train.grad_clip", "train.ema.", "train.tta", "train.target_acc", "train.compile", "train.channels_last",
           "train.keep_freed_memory", "data.batch_size", "train.grad_accum_steps", "train.deterministic",
           "data.global_batch")
LENGTH = ("train.epochs", "train.max_steps")
SPLIT = ("data.batch_size", "train.grad_accum_steps", "data.global_batch")   # of a global batch vetted equal
_FRESH = "start over with checkpoint.resume=never checkpoint.overwrite=true (or another output_dir)"


def vet(path: str, cfg: Config, world: int, run_dir: str) -> None:
    """Main process, with the run folder locked and before anything is loaded or written: refuse a checkpoint this
    config cannot honestly continue, in one line; AlreadyFinished when the run in run_dir has nothing left to do."""
    saved = read_state(path)
    _refuse_another_global_batch(path, saved, cfg, world)
    diff = config_diff(saved["config"], cfg.to_dict())
    _refuse_what_cannot_change(path, diff)
    if diff and (newer := _newer_valid(run_dir, path)):
        raise UserError(f"cannot resume {path} with another {', '.join(diff)}: the folder's newer {', '.join(newer)} "
                        f"would stay, from the old settings, for a later resume to pick up; resume the newest "
                        f"checkpoint, or resume this one in another output_dir (checkpoint.resume={path} "
                        f"output_dir=<new folder>)")
    # another split of the same global batch (a requeue onto another number of processes) trains nothing else
    if not diff.keys() - set(SPLIT) and _finished(run_dir, path):
        raise AlreadyFinished(f"{run_dir} already finished (step {step_of(path)}); nothing to do; evaluate.py "
                              f"--checkpoint {run_dir} to evaluate it again")


def _refuse_another_global_batch(path: str, saved: dict, cfg: Config, world: int) -> None:
    """The global batch (batch_size x processes x grad_accum_steps) is what makes the continued run the same
    training on any number of processes: another one is refused in one line naming the split that keeps it."""
    state = saved["state"]
    theirs, ours = state["global_batch"], cfg.data.batch_size * world * cfg.train.grad_accum_steps
    if theirs == ours:
        return
    sections = {k: v for k, v in saved["config"].items() if isinstance(v, dict)}     # a hand-edited file: no guess
    was = (f"{state.get('world_size', 1)} process(es)" + "".join(
        f" x {section}.{key} {value}" for section, key in (("data", "batch_size"), ("train", "grad_accum_steps"))
        if isinstance(value := sections.get(section, {}).get(key), int)))
    now = f"{world} process(es) x data.batch_size {cfg.data.batch_size} x train.grad_accum_steps " \
          f"{cfg.train.grad_accum_steps}"
    if cfg.data.global_batch is not None:
        fix = f"resume with data.global_batch={theirs}, or {_FRESH}"
    else:
        fix = (f"resume with data.global_batch={theirs} (train.grad_accum_steps then follows the number of "
               f"processes: {alternatives(theirs, cfg.data.batch_size, world)})")
    raise UserError(f"checkpoint {path} was trained with a global batch of {theirs}, this run has {ours} (saved by "
                    f"{was}; now {now}); {fix}")


def _refuse_what_cannot_change(path: str, diff: dict[str, tuple]) -> None:
    """One line for the keys that are neither free nor APPLIED; model.name and data.dataset keep their own."""
    if "model.name" in diff:
        old, new = diff["model.name"]
        raise UserError(f"checkpoint {path} is for model {old}, this run is model {new}; resume with "
                        f"model.name={old}, or start over with checkpoint.resume=never and another output_dir")
    if "data.dataset" in diff:
        old, new = diff["data.dataset"]
        raise UserError(f"checkpoint {path} was trained on data.dataset={old}, this run is data.dataset={new}; "
                        f"resume with data.dataset={old}, or start over with checkpoint.resume=never and "
                        f"another output_dir")
    refused = {k: v for k, v in diff.items() if not k.startswith(APPLIED)}
    if refused:
        changes = ", ".join(f"{k}: {_as_yaml(old)} -> {_as_yaml(new)}" for k, (old, new) in refused.items())
        keep = " ".join(f"{k}={_as_yaml(old)}" for k, (old, _) in refused.items())
        raise UserError(f"cannot resume {path} with another {', '.join(refused)} ({changes}): the steps already "
                        f"trained would belong to another recipe; resume with {keep}, or {_FRESH}")


def resume(checkpoints: Checkpoints, path: str, cfg: Config, total_steps: int) -> tuple[TrainState, list[dict]]:
    """Every rank: load the (vetted) checkpoint and apply the config's changes from its step on. The state, its
    config_changes extended, and the changes made now."""
    saved = read_state(path)
    step = saved["state"]["step"]
    diff = config_diff(saved["config"], cfg.to_dict())
    if diff.keys() & set(LENGTH) and total_steps <= step:
        raise UserError(f"with {', '.join(f'{k}={_as_yaml(diff[k][1])}' for k in LENGTH if k in diff)} the run ends "
                        f"at step {total_steps}, but checkpoint {path} is at step {step}; train longer than that, or "
                        f"evaluate it as it is: evaluate.py --checkpoint {path}")
    state = checkpoints.load(path)
    changes = [{"step": step, "key": key, "from": old, "to": new} for key, (old, new) in diff.items()]
    for change in changes:   # every rank knows; the log shows it once (CIFAR_LOG_ALL_RANKS=1: from each)
        log.info(f"resuming at step {step} with {change['key']}: {_as_yaml(change['from'])} -> {_as_yaml(change['to'])}, "
                 f"applied from step {step + 1} on (recorded in summary.json's config_changes)")
    state.config_changes = [*state.config_changes, *changes]
    saved_world, world = saved["state"].get("world_size", 1), checkpoints.accelerator.num_processes
    if saved_world != world:
        log.info(f"resuming at step {step}, saved by {saved_world} process(es), on {world}: the same global batch of "
                 f"{saved['state']['global_batch']} (train.grad_accum_steps {cfg.train.grad_accum_steps}); rank r "
                 f"restores the RNG states of saved rank r mod {saved_world} (docs/distributed.md)")
    return state, changes


def config_diff(saved: dict, current: dict) -> dict[str, tuple]:
    """{key: (saved value, current value)} for the dotted keys that differ, FREE keys left out; a saved config's
    missing keys read as what its training used (SAVED_DEFAULTS: a checkpoint from before data.normalize existed was
    normalised with the CIFAR statistics). None stands for null and for absent."""
    a, b = flatten(with_saved_defaults(saved), sep="."), flatten(current, sep=".")
    return {k: (a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys())
            if a.get(k) != b.get(k) and not k.startswith(FREE)}


def _own_checkpoints(run_dir: str, path: str) -> list[str]:
    """run_dir's checkpoints when `path` is one of them; [] when it comes from another folder."""
    folder = os.path.join(os.path.abspath(run_dir), CHECKPOINTS)
    return list_checkpoints(folder) if os.path.dirname(os.path.abspath(path)) == folder else []


def _newer_valid(run_dir: str, path: str) -> list[str]:
    """The names of run_dir's checkpoints newer than `path` (one of them) that verify: a damaged one is never
    resumed, and a save at its step replaces it."""
    return [os.path.basename(p) for p in _own_checkpoints(run_dir, path)
            if step_of(p) > step_of(path) and verify(p) is None]


def _finished(run_dir: str, path: str) -> bool:
    """Whether `path` is the final checkpoint of the finished run in run_dir: its own, at summary.json's step, and
    status.json says finished (not a longer rerun that was interrupted)."""
    if not _own_checkpoints(run_dir, path):
        return False
    summary, status = read_summary(run_dir) or {}, read_status(run_dir) or {}
    return status.get("state") == FINISHED and summary.get("steps") == step_of(path)


def _as_yaml(value) -> str:
    """A value as an override would spell it (null, true, 0.01)."""
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()
