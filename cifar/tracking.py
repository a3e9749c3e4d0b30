"""Weights & Biases from the main process only, and never at the cost of training.

    tracker = Tracker.start(cfg, output_dir=run_dir, enabled=accelerator.is_main_process,
                            run_id=resumed_run_id, extra=run_info(cfg, accelerator))
    tracker.log(row)                      # the rows written to metrics.jsonl; row["step"] becomes global_step
    tracker.log_eval(step, confusion, images, labels, preds)
    tracker.summary({"best_test_acc": ...})
    tracker.log_model(folder, files, aliases=["best"], metadata={"step": ...})   # a W&B model artifact
    tracker.finish(exit_code)             # keep tracker.run_id in checkpoints; pass it back on resume

`cfg.wandb.mode` null follows $WANDB_MODE, else W&B is off. Off (or `enabled=False`, the other ranks): wandb is
never imported and every call returns at once. Any W&B failure (not installed, no key, no network, a bad
WANDB_DIR, an exception while logging) prints one `warning: W&B ...` line on stderr and turns the tracker into
a no-op for the rest of the run. Curves are drawn against an explicit `global_step`, so a resumed run continues
where it stopped instead of restarting at wandb's own step 0. A failed model artifact (log_model) only stops the
artifacts: one `warning: W&B log_model ...` line, and metrics go on being logged. What wandb stages besides its
records (tables, images, artifacts) goes under the run's W&B folder too (STAGING), so the run folder carries it.
"""
from __future__ import annotations

import contextlib
import os
import platform
import subprocess

import accelerate
import numpy as np
import torch

from . import yaml_io
from .config import flatten
from .data import CLASSES
from .errors import shorten, warn

MODES = ("online", "offline", "disabled")
# The checkout the code runs from, when it is one: an installed package's folder is not (it has no .git)
CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INIT_TIMEOUT = 30.0          # seconds wandb.init may spend reaching the server; $WANDB_INIT_TIMEOUT overrides
MAX_SAMPLES = 64             # sample predictions per log_eval table
# Where wandb stages what a run logs besides its records (the files of tables, images and model artifacts; the
# backend's logs; downloads), by default under HOME (~/.local/share/wandb, ~/.cache/wandb): inside the run's W&B
# folder instead, so that copying the run folder carries everything `wandb sync` uploads. A value the user set wins.
STAGING = {"WANDB_DATA_DIR": "data", "WANDB_CACHE_DIR": "cache", "WANDB_ARTIFACT_DIR": "artifacts"}


def resolve_mode(mode: str | None, environ=os.environ) -> tuple[str, str | None]:
    """(mode, problem): the config's mode, else $WANDB_MODE, else online under `wandb agent`, else disabled;
    problem names an unusable $WANDB_MODE."""
    if mode is not None:
        return mode, None
    value = environ.get("WANDB_MODE", "").strip().lower()
    value = {"dryrun": "offline", "run": "online"}.get(value, value)  # wandb's older spellings
    if not value:
        # `wandb agent` starts its runs with WANDB_SWEEP_ID set and no WANDB_MODE: they are meant to report
        return ("online", None) if environ.get("WANDB_SWEEP_ID") else ("disabled", None)
    if value not in MODES:
        return "disabled", f"WANDB_MODE={shorten(value)} is not one of {', '.join(MODES)}"
    return value, None


def git_commit() -> str | None:
    """HEAD of the code's git checkout, or None (not a checkout, no git)."""
    if not os.path.exists(os.path.join(CHECKOUT, ".git")):
        return None     # a wheel installed in a venv inside another repository is not that repository's code
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=CHECKOUT, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def run_info(cfg, accelerator) -> dict:
    """What the config does not say about a run: its processes, precision, global batch and device."""
    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    return {"world_size": accelerator.num_processes, "mixed_precision": cfg.train.mixed_precision,
            "global_batch_size": cfg.data.batch_size * accelerator.num_processes * cfg.train.grad_accum_steps,
            "device_type": device.type, "device_name": name}


def agent_parameters(cfg, folder: str, environ=os.environ) -> list[str]:
    """Under `wandb agent`: the agent writes the run's sweep parameters to a file ($WANDB_SWEEP_PARAM_PATH) that
    wandb.init merges into the run's config as given: a dotted name (`optim.lr`) would become a second, flat key
    beside our nested `optim: {lr: ...}`. Rewrite it nested, with the values this run really trained with (the
    command line's), point wandb at the copy, and return the parameters as `key=value` tags."""
    path = environ.get("WANDB_SWEEP_PARAM_PATH")
    if not path or not os.path.isfile(path):
        return []
    import yaml

    with open(path) as f:
        raw = yaml_io.safe_load(f, f"W&B sweep parameters {path}") or {}
    raw.pop("wandb_version", None)
    given = flatten({k: v.get("value") if isinstance(v, dict) and "value" in v else v for k, v in raw.items()}, ".")
    config, nested, tags = cfg.to_dict(), {}, []
    for key, value in given.items():
        node, parts = config, key.split(".")
        for part in parts:
            node = node.get(part, KeyError) if isinstance(node, dict) else KeyError
        if node is KeyError:
            warn(f"W&B sweep parameter {key} is not a config key; it is not in the run's config")
            continue
        if node != value:
            warn(f"W&B sweep parameter {key}={shorten(value)} did not reach train.py (it trained with "
                 f"{shorten(node)}); put ${{args_no_hyphens}} in the sweep's command")
        target = nested
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = node
        tags.append(f"{key}={node:.4g}" if isinstance(node, float) else f"{key}={node}")
    copy = os.path.join(folder, "wandb", f"sweep-parameters-{environ.get('WANDB_RUN_ID', os.getpid())}.yaml")
    os.makedirs(os.path.dirname(copy), exist_ok=True)
    with open(copy, "w") as f:
        yaml.safe_dump({"wandb_version": 1, **{k: {"value": v} for k, v in nested.items()}}, f, sort_keys=False)
    environ["WANDB_SWEEP_PARAM_PATH"] = copy
    return tags


def stage_in(folder: str, environ=os.environ) -> dict[str, str]:
    """Point the STAGING variables the user did not set at <folder>/wandb/...; the ones set, to undo when the run
    ends (a later run in this process stages in its own folder)."""
    staged = {name: os.path.join(os.path.abspath(folder), "wandb", sub) for name, sub in STAGING.items()
              if not environ.get(name)}
    environ.update(staged)
    return staged


def _code_info(wandb) -> dict:
    return {"git_commit": git_commit(), "torch": torch.__version__, "accelerate": accelerate.__version__,
            "wandb": wandb.__version__, "python": platform.python_version()}


class Tracker:
    """One W&B run, or nothing. Build it with Tracker.start; every method is safe to call on any rank."""

    def __init__(self, run_id: str | None = None):
        self._run = None
        self._wandb = None
        self._run_id = run_id
        self._artifacts_failed = False
        self._staged: dict[str, str] = {}      # the staging variables this tracker set (stage_in)

    @property
    def active(self) -> bool:
        """True while a W&B run is being written."""
        return self._run is not None

    @property
    def run_id(self) -> str | None:
        """The W&B run id to store in checkpoints (the one passed to start when W&B is off or failed)."""
        return self._run.id if self._run is not None else self._run_id

    @property
    def run_dir(self) -> str | None:
        """W&B's folder for this run (…/wandb/<offline-run|run>-<time>-<id>), while active."""
        return os.path.dirname(self._run.dir) if self._run is not None else None

    # ------------------------------------------------------------------ start

    @classmethod
    def start(cls, cfg, *, output_dir: str, enabled: bool, run_id: str | None = None, job_type: str | None = None,
              extra: dict | None = None) -> "Tracker":
        """A tracker for this process: a W&B run on the main process when cfg.wandb's mode allows, else a no-op.
        run_id resumes that run (resume="allow"); extra goes into the run's config under `run`."""
        tracker = cls(run_id)
        if not enabled:
            return tracker
        mode, problem = resolve_mode(cfg.wandb.mode)
        if problem:
            warn(f"W&B is off: {problem}")
        if mode == "disabled":
            return tracker
        try:
            tracker._init(cfg, mode, output_dir, run_id, job_type, extra)
        except Exception as e:  # noqa: BLE001 - whatever W&B raises, training goes on
            tracker._fail("init", e)
            tracker._unstage()
        return tracker

    def _init(self, cfg, mode, output_dir, run_id, job_type, extra) -> None:
        folder = os.environ.get("WANDB_DIR") or output_dir
        os.makedirs(folder, exist_ok=True)  # a file in the way raises here; wandb would silently use /tmp
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"W&B folder {folder} is not writable")
        sweep_tags = agent_parameters(cfg, folder)  # before wandb reads its settings
        self._staged = stage_in(folder)             # before wandb starts its backend
        try:
            import wandb
        except ImportError as e:
            raise ImportError(f"wandb cannot be imported ({e}); pip install wandb, or set wandb.mode=disabled") from e

        self._wandb = wandb
        w = cfg.wandb
        # a run started by `wandb agent`: grouped by its sweep unless the config names a group, tagged with its
        # parameters (cifar.sweep passes both on the command line instead)
        sweep_id = os.environ.get("WANDB_SWEEP_ID")
        group = w.group or (f"sweep-{sweep_id}" if sweep_id else cfg.name)
        tags = list(dict.fromkeys(list(w.tags) + sweep_tags))
        # Without a key, wandb.init asks for one on a terminal and waits: check without prompting instead.
        if mode == "online" and not os.environ.get("WANDB_API_KEY") and not wandb.login(prompt=False, verify=False):
            raise RuntimeError("no API key; run `wandb login` or set WANDB_API_KEY, or use wandb.mode=offline")
        config = cfg.to_dict()
        config["run"] = {**_code_info(wandb), **(extra or {})}
        timeout = float(os.environ.get("WANDB_INIT_TIMEOUT") or INIT_TIMEOUT)
        kwargs = dict(mode=mode, project=w.project, entity=w.entity,
                      name=w.name or os.path.basename(os.path.normpath(output_dir)), group=group,
                      tags=tags or None, job_type=job_type or w.job_type, notes=w.notes, config=config,
                      dir=folder, settings=wandb.Settings(init_timeout=timeout))
        if run_id:
            kwargs.update(id=run_id, resume="allow")
        run = wandb.init(**kwargs)
        if getattr(run, "disabled", False):
            raise RuntimeError("wandb.init returned a disabled run")
        self._run = run
        run.define_metric("global_step")
        run.define_metric("*", step_metric="global_step")

    # ------------------------------------------------------------------ logging

    def log(self, row: dict) -> None:
        """One metrics.jsonl row: nested dicts flattened to a/b/c, row["step"] logged as global_step."""
        if self._run is None:
            return
        try:
            data = flatten(row)
            if "step" in data:
                data["global_step"] = data.pop("step")
            self._run.log(data)
        except Exception as e:  # noqa: BLE001
            self._fail("log", e)

    def log_eval(self, step: int, confusion: list[list[int]], images, labels, preds, classes=CLASSES) -> None:
        """An interactive confusion matrix (counts, [true][predicted]) and a table of sample predictions.
        images: float (N, 3, 32, 32) in [0, 1], numpy or CPU tensor; labels, preds: class indices; classes: the
        run's class names, by label."""
        if self._run is None:
            return
        try:
            wandb = self._wandb
            cells = [[classes[i], classes[j], int(n)] for i, row in enumerate(confusion) for j, n in enumerate(row)]
            matrix = wandb.plot_table("wandb/confusion_matrix/v1",
                                      wandb.Table(columns=["Actual", "Predicted", "nPredictions"], data=cells),
                                      {"Actual": "Actual", "Predicted": "Predicted", "nPredictions": "nPredictions"},
                                      {"title": f"confusion matrix, step {step}"})
            if hasattr(images, "detach"):
                images = images.detach().float().cpu().numpy()
            pixels = (np.clip(np.asarray(images, dtype=np.float32)[:MAX_SAMPLES], 0, 1) * 255).round()
            pixels = pixels.astype(np.uint8).transpose(0, 2, 3, 1)
            samples = wandb.Table(columns=["image", "true", "predicted", "correct"])
            for img, label, pred in zip(pixels, labels, preds):
                label, pred = int(label), int(pred)
                samples.add_data(wandb.Image(img), classes[label], classes[pred], label == pred)
            self._run.log({"test/confusion": matrix, "test/samples": samples, "global_step": step})
        except Exception as e:  # noqa: BLE001
            self._fail("log_eval", e)

    def log_model(self, folder: str, files: list[str], aliases: list[str], metadata: dict) -> bool:
        """`files` of `folder` as one version of the model artifact model-<run id> (type model), with `aliases`
        (W&B adds `latest` to the newest version). wandb copies each file into its staging folder
        ($WANDB_DATA_DIR/artifacts/staging) at once, so a checkpoint pruned later still uploads. Any failure:
        one warning, no more artifacts for this run, metrics still logged. True when the artifact was logged."""
        if self._run is None or self._artifacts_failed:
            return False
        try:
            artifact = self._wandb.Artifact(f"model-{self._run.id}", type="model", metadata=metadata)
            for name in files:
                artifact.add_file(os.path.join(folder, name), name=name)
            self._run.log_artifact(artifact, aliases=list(aliases))
            return True
        except Exception as e:  # noqa: BLE001
            self._artifacts_failed = True
            warn(f"W&B log_model failed, continuing without model artifacts (metrics are still logged): "
                 f"{self._describe(e)}")
            return False

    def summary(self, values: dict) -> None:
        """Final figures (final/best accuracy, wall time, ...) into the run's summary; None values skipped."""
        if self._run is None:
            return
        try:
            self._run.summary.update({k: v for k, v in values.items() if v is not None})
        except Exception as e:  # noqa: BLE001
            self._fail("summary", e)

    def finish(self, exit_code: int = 0) -> None:
        """Close the run (non-zero exit_code marks it failed); later calls do nothing."""
        run, self._run = self._run, None
        if run is None:
            return
        self._run_id = run.id
        try:
            run.finish(exit_code=exit_code)
        except Exception as e:  # noqa: BLE001
            self._fail("finish", e)
        self._unstage()

    def _unstage(self) -> None:
        """Undo stage_in: the variables this tracker set, unless something else changed them since."""
        for name, value in self._staged.items():
            if os.environ.get(name) == value:
                del os.environ[name]
        self._staged = {}

    # ------------------------------------------------------------------ failure

    def _fail(self, where: str, error: Exception) -> None:
        if self._run is not None:
            self._run_id = self._run.id
        self._run = None
        warn(f"W&B {where} failed, continuing without W&B: {self._describe(error)}")
        if isinstance(error, ConnectionError) and self._wandb is not None:
            # the backend process is gone (killed, crashed): tear down now, so that wandb's exit hook does not
            # try to reach it again and print a traceback as the process exits
            with contextlib.suppress(Exception):
                self._wandb.teardown()

    @staticmethod
    def _describe(error: Exception) -> str:
        """`Type: message` on one line, at most 300 characters of message, the API key masked."""
        message = " ".join(str(error).split()) or type(error).__name__
        key = os.environ.get("WANDB_API_KEY")
        if key:
            message = message.replace(key, "***")
        return f"{type(error).__name__}: {message[:300]}"
