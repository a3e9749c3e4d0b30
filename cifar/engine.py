"""The training loop on Accelerate: one CPU, one GPU or many, read top to bottom.

train() is the recipe: start_run builds everything the loop needs (resumed from a checkpoint when there is one, the
config's changes applied or refused by cifar/resume.py), then each epoch is optimizer steps over accumulation
windows, each followed by the checkpointer's decision whether a save is due, then an evaluation and the epoch's row;
the end is a summary. Everything reported goes through run.report, one call per event. Diverged weights or losses
are never saved (cifar/divergence.py).
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from .checkpoint import Checkpoints, TrainState, pause_point
from .config import Config
from .data import TrainBatches, build_batches, num_classes
from .divergence import blow_up_fault, check_loss, check_weights
from .ema import Ema, build_ema
from .errors import Stopped, resume_advice, resume_command, set_resume
from .evaluation import EvalResult, evaluate
from .finetune import hold_frozen_norms, prepare_model
from .lock import RunLock
from .models import expiring_parameters, model_from_config, train_only_until
from .optim import build_optimizer
from .outputs import claim_run_dir
from .perf import compile_warmup, compiled_graphs, flops_per_image, mfu
from .profiling import StepProfiler, step_profiler
from .reporting import Reporter
from .resume import resume, vet
from .run_folder import LATEST, read_pointer
from .runtime import make_accelerator, on_main, shut_down
from .schedule import build_scheduler
from .signals import StopRequest
from .step import StepStats, feed, train_loss, train_step, windows
from .tracking import run_info
from .worlds import fit


@dataclass
class Meters:
    """Running sums of the epoch and of the log window (which may span epochs), and the training clock: the
    seconds of finished epochs, plus the current one's since epoch_start."""
    epoch: StepStats
    window: StepStats
    window_start: float
    train_seconds: float
    epoch_start: float


@dataclass
class Run:
    """Everything the loop works with, built once by start_run."""
    cfg: Config
    accelerator: Accelerator
    model: torch.nn.Module          # as prepared: DDP-wrapped and/or compiled
    raw_model: torch.nn.Module      # what is saved and loaded
    optimizer: torch.optim.Optimizer  # Accelerate's wrapper; .optimizer is the plain one, saved and loaded
    scheduler: torch.optim.lr_scheduler.LambdaLR
    loss_fn: torch.nn.Module
    train_batches: TrainBatches
    test_batches: TrainBatches      # epoch(0) is the test set, this rank's shard
    expiring: dict                  # parameters trained until a step (models.expiring_parameters)
    ema: Ema | None                 # train.ema: the moving average of raw_model's weights
    checkpoints: Checkpoints
    lock: RunLock                   # held by the main process for the whole run
    report: Reporter
    stop: StopRequest
    state: TrainState
    meters: Meters
    total_steps: int
    epochs: int
    output_dir: str
    resumed_from: str | None
    data_seconds: float
    flops: float
    compile_seconds: float
    profiler: StepProfiler | None = None    # train.profile: traces the first optimizer steps (main process)


def train(cfg: Config) -> dict:
    stop = StopRequest().install()     # first: a signal during start-up is honoured at the first step
    try:
        run = start_run(cfg, stop)
    except BaseException:              # refused (or nothing to do): the caller's own handlers come back
        stop.uninstall()
        raise
    cfg = run.cfg                      # as this world size trains it (train.grad_accum_steps from data.global_batch)
    state, t = run.state, cfg.train
    result, ema_row, graphs_before, wall_start = None, {}, compiled_graphs(), run.meters.window_start
    run.report.training(run.total_steps, state.step)
    try:
        for epoch in range(state.epoch, run.epochs):
            row = train_epoch(run, epoch)              # raises Stopped after saving when a signal came
            evaluated = (epoch + 1) % t.eval_every_epochs == 0 or epoch == run.epochs - 1
            if evaluated:
                result = evaluate_now(run)
                ema_row = evaluate_ema(run)
                row.update(result.as_row(), **ema_row)
            run.report.epoch(row, result if evaluated else None)
            state.epoch, state.samples_in_epoch = epoch + 1, 0
            run.meters.epoch, run.meters.epoch_start = StepStats.start(run.accelerator.device), time.perf_counter()
            if run.checkpoints.should_save(state.step, epoch_end=epoch):
                save_checkpoint(run, result.accuracy if evaluated else None)
        check_finite(run)                              # the final weights, before anything writes them
    except Stopped:
        raise
    except BaseException as e:
        stop.uninstall()
        run.report.failed(state.step, e)
        raise
    stop.uninstall()
    # compiling inside the loop counts as training time: a graph variant the warm-up missed shows here
    graphs_in_training = compiled_graphs() - graphs_before if t.compile else None
    if result is None:                                   # resumed a run that had already finished training
        result = evaluate(run.model, run.test_batches, run.accelerator, tta=t.tta, top_k=t.top_k)
        state.best_acc = max(state.best_acc or 0.0, result.accuracy)
        ema_row = evaluate_ema(run)
    summary = summarize(run, result, time.perf_counter() - wall_start, graphs_in_training, ema_row)
    run.accelerator.wait_for_everyone()
    run.report.finished(summary, run.raw_model, run.total_steps, run.ema)
    shut_down(run.accelerator)
    run.lock.release()
    return summary


def train_epoch(run: Run, epoch: int) -> dict:
    """The optimizer steps of one epoch (of what is left of it, when resumed in its middle); its row."""
    cfg, state, meters, accelerator = run.cfg, run.state, run.meters, run.accelerator
    world = accelerator.num_processes
    run.model.train()
    hold_frozen_norms(run.raw_model, cfg.model)      # model.freeze=backbone: its BatchNorm statistics stay
    train_only_until(run.expiring, state.step)       # expiring parameters stop at an epoch's start
    resumed = epoch == state.epoch and state.samples_in_epoch > 0
    skip = state.samples_in_epoch // (cfg.data.batch_size * world) if resumed else 0
    meters.epoch = StepStats.start(accelerator.device, state.epoch_sums if resumed else (0.0, 0, 0),
                                   accelerator.is_main_process)
    state.epoch, state.samples_in_epoch = epoch, state.samples_in_epoch if resumed else 0
    meters.epoch_start = time.perf_counter()
    done, waited, batches = skip, [0.0], len(run.train_batches)
    for window in windows(feed(run.train_batches.epoch(epoch, skip), waited, cfg.train.channels_last),
                          cfg.train.grad_accum_steps):
        done += len(window)
        optimizer_step(run, window, epoch)
        stopping = run.stop.agreed(accelerator)
        if run.checkpoints.should_save(state.step, last_window=done == batches, stopping=stopping):
            path = save_checkpoint(run)
            if stopping:
                run.report.stopped(state.step, run.stop.name, path)
                # The handlers stay installed: the launcher's own SIGTERM to the other ranks (sent when the first
                # one exits) must not turn their resumable exit into a kill.
                raise Stopped(f"{run.stop.name} at step {state.step}; checkpoint {path or 'saved by rank 0'}; "
                              f"{resume_advice()}")
        if state.step == run.total_steps:
            break
    if accelerator.device.type == "cuda":
        torch.cuda.synchronize()         # the epoch's queued kernels belong to its time
    epoch_time = time.perf_counter() - meters.epoch_start
    meters.train_seconds += epoch_time
    loss, correct, samples = meters.epoch.totals(accelerator)
    state.samples_seen += samples
    return {"step": state.step, "epoch": epoch, "lr": state.lr, "epoch_time": epoch_time,
            "train/epoch_loss": loss / samples, "train/epoch_acc": 100.0 * correct / samples,
            "images_per_sec": samples / epoch_time, "data_wait": waited[0]}


def optimizer_step(run: Run, window: list, epoch: int) -> None:
    """One optimizer step over an accumulation window; a row is reported every train.log_every_steps."""
    cfg, state, meters, t = run.cfg, run.state, run.meters, run.cfg.train
    state.lr = run.optimizer.param_groups[0]["lr"]
    loss_sum, correct, n, grad_norm, stepped = train_step(run.accelerator, run.model, run.optimizer, run.loss_fn,
                                                          window, t.grad_clip)
    if stepped:                                  # fp16 overflow skips a step: the schedule waits too
        run.scheduler.step()
    state.step += 1
    blow_up_fault(run.raw_model, state.step)     # the divergence tests' CIFAR_FAULT; nothing otherwise
    pause_point("pause-at-step", state.step)     # the signal tests' hold mid-run, in runs that save nothing there
    if run.ema:
        run.ema.after_step(run.raw_model, state.step)
    if run.profiler:
        run.profiler.step(last=state.step == run.total_steps)
    state.samples_in_epoch += len(window) * cfg.data.batch_size * run.accelerator.num_processes
    meters.epoch.add(loss_sum, correct, n)
    meters.window.add(loss_sum, correct, n)
    row = None
    if state.step % t.log_every_steps == 0 or state.step == run.total_steps:
        loss, correct_total, samples = meters.window.totals(run.accelerator)
        row = {"step": state.step, "epoch": epoch, "lr": state.lr, "train/loss": loss / samples,
               "train/acc": 100.0 * correct_total / samples,
               "images_per_sec": samples / (time.perf_counter() - meters.window_start)}
        if grad_norm is not None:
            row["grad_norm"] = grad_norm
        meters.window, meters.window_start = StepStats.start(run.accelerator.device), time.perf_counter()
    run.report.step(state.step, row)


def evaluate_now(run: Run) -> EvalResult:
    """The test set at the end of an epoch: timed apart from training, and ranked for best and time-to-target."""
    state, t = run.state, run.cfg.train
    start = time.perf_counter()
    result = evaluate(run.model, run.test_batches, run.accelerator, tta=t.tta,
                      samples=16 if run.report.wants_samples else 0, top_k=t.top_k)
    state.eval_seconds += time.perf_counter() - start
    check_loss(result.loss, "the test loss", state.step, latest_checkpoint(run))
    state.best_acc = max(state.best_acc or 0.0, result.accuracy)
    if t.target_acc is not None and state.time_to_target is None and result.accuracy >= t.target_acc:
        state.time_to_target, state.steps_to_target = run.meters.train_seconds, state.step
    return result


def evaluate_ema(run: Run) -> dict:
    """The moving average on the test set, beside the weights' own evaluation: its row entries ({} without one)."""
    if run.ema is None:
        return {}
    state, start = run.state, time.perf_counter()
    result = evaluate(run.ema.module, run.test_batches, run.accelerator, tta=run.cfg.train.tta)
    state.eval_seconds += time.perf_counter() - start
    check_loss(result.loss, "the moving average's test loss", state.step, latest_checkpoint(run))
    state.best_ema_acc = max(state.best_ema_acc or 0.0, result.accuracy)
    return {"test/ema_loss": result.loss, "test/ema_acc": result.accuracy}


def save_checkpoint(run: Run, acc: float | None = None) -> str | None:
    """A checkpoint of where the loop stands now (every rank calls this; the main process writes); never of
    diverged weights."""
    state, meters = run.state, run.meters
    check_finite(run)
    state.epoch_sums, state.log_sums = meters.epoch.totals(run.accelerator), meters.window.totals(run.accelerator)
    state.train_seconds = meters.train_seconds + (time.perf_counter() - meters.epoch_start)
    path = run.checkpoints.save(state, acc)
    run.report.checkpoint(path, state.step, acc)       # W&B model artifact (wandb.log_model), main process only
    return path


def check_finite(run: Run) -> None:
    """Diverged when the weights or their moving average are no longer finite numbers of a sane size."""
    models = {"weight": run.raw_model, **({"moving-average weight": run.ema.module} if run.ema else {})}
    check_weights(models, run.state.step, latest_checkpoint(run))


def latest_checkpoint(run: Run) -> str | None:
    """The newest checkpoint saved, which a rerun resumes from (None before any). Every rank reads the folder (each
    loads its checkpoints on resume), so that each rank's error line names it."""
    return read_pointer(run.checkpoints.folder, LATEST)


# ----------------------------------------------------------------------------- start and end

def start_run(cfg: Config, stop: StopRequest) -> Run:
    """Data, model, optimizer and schedule for the config, resumed from a checkpoint when there is one, and the
    compile warm-up (timed apart)."""
    accelerator = make_accelerator(cfg)
    # data.global_batch: the accumulation for this number of processes, or one line naming those that keep it
    cfg = fit(cfg, accelerator.num_processes)
    output_dir = on_main(accelerator, lambda: cfg.output_dir or os.path.join(
        "runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    set_resume(resume_command(output_dir, given=bool(cfg.output_dir)))   # every "resume" advice names the folder
    # Before any work: one writer per folder, and the checkpoint to resume from (refusing, rather than starting
    # over, when there are checkpoints and none verifies, or when the config changed what it cannot change; a
    # finished run with the same config stops here, AlreadyFinished). The main process decides; every rank loads
    # it below.
    lock = RunLock(output_dir)
    try:
        return _prepared(cfg, stop, accelerator, output_dir, lock)
    except BaseException:
        # refused, or nothing to do: the folder is free at once, not when the lock object is collected (a caller
        # in the same process, a notebook or a test, may start on it next)
        lock.release()
        raise


def _prepared(cfg: Config, stop: StopRequest, accelerator, output_dir: str, lock: RunLock) -> Run:
    main, world, t = accelerator.is_main_process, accelerator.num_processes, cfg.train
    resumed_from = on_main(accelerator, lambda: claim_run_dir(output_dir, cfg.checkpoint, lock,
                                                              vet=lambda path: vet(path, cfg, world, output_dir)))
    set_seed(cfg.seed)
    data_start = time.perf_counter()
    train_batches, test_batches = build_batches(accelerator, cfg.data, cfg.seed, t.grad_accum_steps)
    data_seconds = time.perf_counter() - data_start
    model = model_from_config(cfg.model, num_classes(cfg.data))
    if hasattr(model, "init_from_data"):          # e.g. FastNet's whitening filters
        model.init_from_data(train_batches.first_images(5000).cpu())
    initialised = prepare_model(model, cfg, resumed=bool(resumed_from))   # model.init_from (not on resume), freeze
    if t.channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = math.ceil(len(train_batches) / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    expiring = expiring_parameters(cfg.model, model, steps_per_epoch)
    model, optimizer = accelerator.prepare(model, build_optimizer(cfg.optim, model, expiring))
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)
    scheduler = build_scheduler(cfg.schedule, optimizer.optimizer, total_steps)
    ema = build_ema(t.ema, raw_model)
    checkpoints = Checkpoints(output_dir, cfg, accelerator, model=raw_model, optimizer=optimizer.optimizer,
                              scheduler=scheduler, total_steps=total_steps, epochs=epochs, ema=ema)

    global_batch = cfg.data.batch_size * world * t.grad_accum_steps
    state, changes = TrainState(global_batch=global_batch, world_size=world), []
    if resumed_from:
        state, changes = resume(checkpoints, resumed_from, cfg, total_steps)
        state.global_batch, state.world_size = global_batch, world     # what later checkpoints say was trained
        # a run that train.max_steps ended mid-epoch continues, when trained longer, at the next epoch's start (its
        # checkpoint counts that epoch as done): the epochs still to go are counted from there
        epochs = checkpoints.epochs = max(epochs, state.epoch + math.ceil((total_steps - state.step) / steps_per_epoch))
    state.init_from = initialised or state.init_from      # a resumed run keeps its record of what it started from
    info = {**run_info(cfg, accelerator), **({"init_from": state.init_from} if state.init_from else {})}
    report = Reporter(cfg, output_dir, main=main, run_info=info,
                      resume_step=state.step if resumed_from else None, wandb_run_id=state.wandb_run_id)
    state.wandb_run_id = report.started(state.step, state.epoch, total_steps, world, resumed_from, changes)

    # FLOPs for the MFU estimate and the compile warm-up: measured before, and apart from, the training time, and
    # invisible to the RNG: a dropout mask drawn here would shift every later draw, so that a resumed run's draws
    # would no longer be the uninterrupted run's
    loss_fn = train_loss(t.label_smoothing)
    compile_seconds = 0.0
    with torch.random.fork_rng(devices=[accelerator.device] if accelerator.device.type == "cuda" else []):
        probe = next(iter(train_batches.epoch(0)))
        flops = flops_per_image(raw_model, probe[0][:32])
        if t.compile:
            compile_seconds = compile_warmup(
                model, optimizer, accelerator.scaler,
                lambda: train_step(accelerator, model, optimizer, loss_fn, [probe], t.grad_clip),
                lambda: evaluate(model, test_batches, accelerator, tta=t.tta),
                # a frozen parameter changes the graph: compile that one too, or it would compile mid-run
                phases=[lambda step=step: train_only_until(expiring, step)
                        for step in sorted({0, *expiring.values()})])
    if t.compile:
        report.print(f"compiled in {compile_seconds:.1f}s (not counted as training time)")
    now = time.perf_counter()
    meters = Meters(epoch=StepStats.start(accelerator.device), window=StepStats.start(accelerator.device,
                                                                                      state.log_sums, main),
                    window_start=now, train_seconds=state.train_seconds, epoch_start=now)
    return Run(cfg=cfg, accelerator=accelerator, model=model, raw_model=raw_model, optimizer=optimizer,
               scheduler=scheduler, loss_fn=loss_fn, train_batches=train_batches, test_batches=test_batches,
               expiring=expiring, ema=ema, checkpoints=checkpoints, lock=lock, report=report, stop=stop,
               state=state, meters=meters, total_steps=total_steps, epochs=epochs, output_dir=output_dir,
               resumed_from=resumed_from, data_seconds=data_seconds, flops=flops, compile_seconds=compile_seconds,
               profiler=step_profiler(t.profile, output_dir, accelerator))


def summarize(run: Run, result: EvalResult, wall_seconds: float, graphs_in_training: int | None,
              ema_row: dict) -> dict:
    """summary.json: the final evaluation, the times, and what the run was."""
    cfg, state, accelerator, t = run.cfg, run.state, run.accelerator, run.cfg.train
    train_seconds = run.meters.train_seconds
    return {
        "name": cfg.name, "output_dir": run.output_dir, "steps": state.step, "epochs": run.epochs,
        "final_test_acc": result.accuracy, "best_test_acc": state.best_acc, "final_test_loss": result.loss,
        **result.top_k_entry("final_test_acc"), "top_k": t.top_k,
        "final_ema_test_acc": ema_row.get("test/ema_acc"), "best_ema_test_acc": state.best_ema_acc,
        "per_class_acc": result.per_class, "wall_seconds": wall_seconds,
        "train_seconds": train_seconds, "images_per_sec": state.samples_seen / max(train_seconds, 1e-9),
        "world_size": accelerator.num_processes, "mixed_precision": t.mixed_precision,
        "global_batch_size": state.global_batch, "device": accelerator.device.type,
        "resumed_from": run.resumed_from, "config_changes": state.config_changes, "wandb_run_id": state.wandb_run_id,
        "init_from": state.init_from,    # model.init_from: the weights file, its SHA-256, what was not loaded
        "tta": t.tta, "target_acc": t.target_acc, "time_to_target": state.time_to_target,
        "steps_to_target": state.steps_to_target, "data_seconds": run.data_seconds,
        "compile_seconds": run.compile_seconds, "eval_seconds": state.eval_seconds,
        "compile_mode": accelerator.state.dynamo_plugin.mode if t.compile else None,
        "graphs_compiled_in_training": graphs_in_training, "flops_per_image": run.flops,
        "mfu": mfu(run.flops, state.samples_seen, train_seconds, accelerator, t.mixed_precision),
    }
