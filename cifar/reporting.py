"""Everything a training run reports goes through one Reporter, one call per event: it fans the event out to the
run folder (metrics.jsonl, status.json, summary.json, final weights), W&B and the console. The other ranks get a
Reporter whose sinks are all off, so the loop calls it the same way everywhere."""
from __future__ import annotations

import os

from .config import Config
from .console import Console
from .errors import EXIT_RESUMABLE, SaveFailed, disk_fault, warn
from .evaluation import EvalResult
from .outputs import RunWriter
from .run_folder import (BEST, CONFIG, EMA_WEIGHTS, FAILED, FINISHED, RUNNING, SAVE_FAILED, STOPPED, SUMMARY, WEIGHTS,
                         read_pointer)
from .tracking import Tracker


class Reporter:
    def __init__(self, cfg: Config, output_dir: str, *, main: bool, run_info: dict, resume_step: int | None,
                 wandb_run_id: str | None):
        """A fresh run starts metrics.jsonl anew; a resumed one (resume_step given) continues it. The W&B run
        continues too when its id was kept in the checkpoint."""
        self.console = Console(enabled=main, ema=cfg.train.ema.decay is not None)
        self.writer = RunWriter(output_dir, cfg, resume_step) if main else None
        self.cfg, self.output_dir, self.run_info, self.wandb_run_id = cfg, output_dir, run_info, wandb_run_id
        self.tracker = Tracker(wandb_run_id)

    def started(self, step: int, epoch: int, total_steps: int, world: int, resumed_from: str | None,
                config_changes: list[dict] = ()) -> str | None:
        """The run begins (or resumes at `step`, with `config_changes` applied from there: a metrics.jsonl row at that
        step names each, old and new value); returns the W&B run id to keep in checkpoints."""
        self.console.config(self.cfg.to_yaml(), self.output_dir)
        if resumed_from:
            self.console.print(f"resuming from {resumed_from} (step {step}, epoch {epoch})")
        if self.writer:
            self.writer.status(RUNNING, step=step, total_steps=total_steps, world_size=world,
                               resumed_from=resumed_from)
        self.tracker = Tracker.start(self.cfg, output_dir=self.output_dir, enabled=self.writer is not None,
                                     run_id=self.wandb_run_id, extra=self.run_info)
        if config_changes:
            self._log({"step": step, "config_changes": {c["key"]: {"from": c["from"], "to": c["to"]}
                                                        for c in config_changes}})
        return self.tracker.run_id

    @property
    def wants_samples(self) -> bool:
        """Whether evaluations should keep a few images and predictions (W&B shows them)."""
        return self.tracker.active

    def print(self, text: str) -> None:
        self.console.print(text)

    def training(self, total_steps: int, first_step: int) -> None:
        self.console.start(total_steps, first_step)

    def step(self, step: int, row: dict | None) -> None:
        """After every optimizer step; row holds the logged metrics on the steps that log."""
        if row is not None:
            self._log(row)
        self.console.step(step, row)

    def epoch(self, row: dict, result: EvalResult | None) -> None:
        """An epoch's row, with its evaluation's metrics when it had one."""
        self._log(row)
        if result is not None and result.samples:
            self.tracker.log_eval(row["step"], result.confusion, *result.samples, classes=list(result.per_class))
        self.console.epoch(row)

    def checkpoint(self, path: str | None, step: int, acc: float | None) -> None:
        """A checkpoint was saved (path: on the main process; None elsewhere). wandb.log_model=all logs it as a
        model artifact (aliases latest, step-N, and best when the checkpoint module's `best` pointer names it);
        best logs it only when the pointer names it, i.e. when it became the best by test accuracy."""
        mode = self.cfg.wandb.log_model
        if path is None or mode not in ("best", "all") or not self.tracker.active:
            return
        is_best = read_pointer(os.path.dirname(path), BEST) == path
        if mode == "best" and not is_best:
            return
        aliases = ([f"step-{step}"] if mode == "all" else []) + (["best"] if is_best else [])
        files = sorted(name for name in os.listdir(path) if not name.startswith("."))   # the manifest's and itself
        self.tracker.log_model(path, files, aliases, {"kind": "checkpoint", "step": step, "test_acc": acc,
                                                      "checkpoint": os.path.basename(path), "model": self.cfg.model.name})

    def stopped(self, step: int, signal: str, checkpoint: str | None) -> None:
        """Stopped on a signal after saving a checkpoint: resumable."""
        self.console.stop()
        if self.writer:
            self.writer.status(STOPPED, step=step, signal=signal, checkpoint=checkpoint)
        self.tracker.finish(EXIT_RESUMABLE)

    def failed(self, step: int, error: BaseException) -> None:
        """save-failed when a write to the run folder failed (the process exits 74), else failed."""
        self.console.stop()
        if self.writer:
            state = SAVE_FAILED if isinstance(error, SaveFailed) or disk_fault(error) else FAILED
            try:
                self.writer.status(state, step=step, error=f"{type(error).__name__}: {error}".splitlines()[0])
            except OSError as e:       # the disk that failed the run: its error, not this one, is what to show
                warn(f"could not record the failure in {self.writer.dir}/status.json ({e.strerror})")
        self.tracker.finish(1)

    def finished(self, summary: dict, model, total_steps: int, ema=None) -> None:
        """Training is over: the final weights (and their moving average), summary.json, the W&B summary and the
        console's table."""
        self.console.stop()
        if self.writer:
            try:
                self.writer.save_weights(model, ema)
                self.writer.save_summary(summary)
                self.writer.status(FINISHED, step=summary["steps"], total_steps=total_steps)
            except OSError as e:        # the run folder refused a write: save-failed, where it can still be said
                self.failed(summary["steps"], e)
                raise
            self.writer.close()
            if self.cfg.wandb.log_model in ("final", "all"):
                files = [WEIGHTS, *([EMA_WEIGHTS] if ema is not None else []), CONFIG, SUMMARY]
                self.tracker.log_model(self.writer.dir, files, ["final"],
                                       {"kind": "final", "step": summary["steps"],
                                        "test_acc": summary["final_test_acc"], "model": self.cfg.model.name})
        self.tracker.summary(summary)
        self.tracker.finish(0)
        self.console.summary(summary)

    def _log(self, row: dict) -> None:
        if self.writer:
            self.writer.log(row)
        self.tracker.log(row)
