"""The training loop on Accelerate: one CPU, one GPU or many, read top to bottom."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import (DataLoaderConfiguration, DistributedDataParallelKwargs, TorchDynamoPlugin,
                               broadcast_object_list, gather_object, set_seed)

from .checkpoint import Checkpoints, TrainState, rng_state
from .config import Config
from .console import Console
from .data import build_batches
from .errors import EXIT_RESUMABLE, Stopped, UserError
from .evaluation import evaluate
from .models import build_model, expiring_parameters
from .optim import build_optimizer
from .outputs import RunWriter
from .schedule import build_scheduler
from .signals import StopRequest
from .perf import compile_warmup, compiled_graphs, device_peak, flops_per_image, keep_freed_memory
from .tracking import Tracker, run_info


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not cuda:
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
    if cuda:    # fixed shapes: let cuDNN time its conv algorithms once; fp32 matmuls may use TF32
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    elif cfg.train.keep_freed_memory:
        keep_freed_memory()
    mode = compile_mode(cfg.train.compile_mode, int(os.environ.get("WORLD_SIZE", "1")))
    dynamo = TorchDynamoPlugin(backend="inductor" if cfg.train.compile else "no", mode=mode)
    # A parameter that stops training mid-run (model.whiten_bias_epochs) gets no gradient afterwards; DDP's reducer
    # then fails the next step unless it looks for unused parameters in every backward pass.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg.model.whiten_bias_epochs is not None)
    # Gradient accumulation is done by the engine (see train_step), so Accelerate's own count stays at 1.
    return Accelerator(cpu=not cuda, mixed_precision=precision, dynamo_plugin=dynamo, kwargs_handlers=[ddp],
                       dataloader_config=DataLoaderConfiguration(non_blocking=cuda))  # with pinned batches


def compile_mode(mode: str, world: int) -> str:
    """torch.compile's mode for a run of `world` processes. CUDA graphs around DDP's bucketed all-reduce are
    untested here, so several processes compile the same way without them."""
    if world > 1:
        return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
    return mode


def train_only_until(expiring: dict, step: int) -> None:
    """Freeze each expiring parameter from its step on. Frozen, it gets no gradient (the optimizer skips it, its
    lr has reached 0 anyway) and autograd skips the backward pass below it."""
    for p, until in expiring.items():
        p.requires_grad_(step < until)


def on_main(accelerator: Accelerator, fn):
    """Run fn on the main process only and hand every rank its result, or the same UserError."""
    box = [None]
    if accelerator.is_main_process:
        try:
            box[0] = ("ok", fn())
        except UserError as e:
            box[0] = ("error", str(e))
    if accelerator.num_processes > 1:
        broadcast_object_list(box, from_process=0)
    kind, value = box[0]
    if kind == "error":
        raise UserError(value)
    return value


@dataclass
class StepStats:
    """Running sums on the device (two in-place ops a step), read with one sync when a row is logged or a
    checkpoint saved."""
    loss_sum: torch.Tensor     # float64
    correct: torch.Tensor      # int64
    samples: int

    @classmethod
    def start(cls, device, sums=(0.0, 0, 0), mine: bool = True):
        """Counters beginning at `sums` (global totals restored from a checkpoint) on one rank, zero elsewhere."""
        loss, correct, samples = sums if mine else (0.0, 0, 0)
        return cls(torch.tensor(float(loss), device=device, dtype=torch.float64),
                   torch.tensor(int(correct), device=device, dtype=torch.long), int(samples))

    def add(self, loss_sum, correct, n):
        self.loss_sum += loss_sum
        self.correct += correct
        self.samples += n

    def totals(self, accelerator) -> list:
        """[loss sum, correct, samples] over all ranks; raises when training has diverged."""
        local = torch.stack([self.loss_sum, self.correct.double(),
                             torch.tensor(float(self.samples), device=self.loss_sum.device, dtype=torch.float64)])
        loss_sum, correct, samples = accelerator.reduce(local, "sum").tolist()
        if not math.isfinite(loss_sum):
            raise UserError(f"training diverged: the loss became {loss_sum}; lower optim.lr or set train.grad_clip "
                            f"(the last good checkpoint is kept)")
        return [loss_sum, int(correct), int(samples)]


def train_step(accelerator, model, optimizer, loss_fn, window, grad_clip) -> tuple[torch.Tensor, torch.Tensor,
                                                                                int, float | None, bool]:
    """One optimizer step over a window of micro-batches: (loss sum, correct, images, grad norm, stepped).

    Each micro-batch's summed loss is divided by the window's real sample count, so a short last window of an
    epoch weighs each sample exactly as a full one does. DDP averages over ranks, which Accelerate keeps at equal
    batch sizes. Gradients synchronise only on the window's last micro-batch.
    """
    n = sum(len(labels) for _, labels in window)
    loss_total = correct = None
    for i, (images, labels) in enumerate(window):
        last = i == len(window) - 1
        with accelerator.no_sync(model) if not last else contextlib.nullcontext():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
            if accelerator.scaler is not None:
                accelerator.backward(loss / n)       # fp16: scaled by Accelerate's grad scaler
            else:
                (loss / n).backward()                # what accelerator.backward does here, minus a no-op /1
        hits = (logits.argmax(1) == labels).sum()
        loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        correct = hits if correct is None else correct + hits
    grad_norm = None
    if grad_clip is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip))
    if accelerator.scaler is not None:       # fp16: Accelerate's optimizer wrapper drives the grad scaler
        optimizer.step()
        stepped = not optimizer.step_was_skipped
    else:                                    # the plain optimizer: the wrapper's per-step bookkeeping costs ~10%
        optimizer.optimizer.step()           # of a small model's step, and gradient sync is ours to manage
        stepped = True
    optimizer.optimizer.zero_grad(set_to_none=True)
    return loss_total, correct, n, grad_norm, stepped


def mfu(flops: float, images: int, seconds: float, accelerator, precision: str) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the devices' peak (None where the peak is unknown)."""
    peak = device_peak(accelerator.device, precision)
    if peak is None or seconds <= 0:
        return None
    return flops * images / seconds / (peak * accelerator.num_processes)


def feed(batches, waited: list, channels_last: bool):
    """The batches, with the time spent waiting for each added to waited[0] (a starved GPU shows here)."""
    it = iter(batches)
    while True:
        start = time.perf_counter()
        try:
            images, labels = next(it)
        except StopIteration:
            return
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        waited[0] += time.perf_counter() - start
        yield images, labels


def windows(batches, size: int):
    """Group an epoch's micro-batches into accumulation windows; the last one may be shorter."""
    window = []
    for batch in batches:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def train(cfg: Config) -> dict:
    stop = StopRequest().install()     # first: a signal during start-up is honoured at the first step
    accelerator = make_accelerator(cfg)
    main, world = accelerator.is_main_process, accelerator.num_processes
    output_dir = on_main(accelerator, lambda: cfg.output_dir or os.path.join(
        "runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"))
    console = Console(enabled=main)

    set_seed(cfg.seed)
    data_start = time.perf_counter()
    train_batches, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    data_seconds = time.perf_counter() - data_start
    model = build_model(cfg.model.name)
    if hasattr(model, "init_from_data"):          # e.g. FastNet's whitening filters
        model.init_from_data(train_batches.first_images(5000).cpu())
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    t = cfg.train
    steps_per_epoch = math.ceil(len(train_batches) / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    expiring = expiring_parameters(cfg.model, model, steps_per_epoch)
    optimizer = build_optimizer(cfg.optim, model, expiring)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model, keep_torch_compile=False)   # what is saved and loaded
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=cfg.train.label_smoothing)
    scheduler = build_scheduler(cfg.schedule, optimizer.optimizer, total_steps)
    global_batch = cfg.data.batch_size * world * t.grad_accum_steps

    # ---- resume: the main process picks the checkpoint (warning about unusable ones), every rank loads it
    ckpts = Checkpoints(output_dir, cfg, main)
    state = TrainState(global_batch=global_batch, world_size=world)
    resume_from = on_main(accelerator, ckpts.resume_path)
    if resume_from:
        state = ckpts.load(resume_from, raw_model, optimizer.optimizer, scheduler,
                           accelerator.scaler, accelerator.process_index)
        if state.global_batch != global_batch:
            raise UserError(f"checkpoint {resume_from} was trained with a global batch of {state.global_batch}, "
                            f"this run has {global_batch} (batch_size x processes x grad_accum_steps); keep it equal")
    console.config(cfg.to_yaml(), output_dir)
    if resume_from:
        console.print(f"resuming from {resume_from} (step {state.step}, epoch {state.epoch})")
    writer = RunWriter(output_dir, cfg, resume_step=state.step if resume_from else None) if main else None
    if writer:
        writer.status("running", step=state.step, total_steps=total_steps, world_size=world, resumed_from=resume_from)
    # A resumed run continues its W&B run: the id travels in the checkpoint
    tracker = Tracker.start(cfg, output_dir=output_dir, enabled=main, run_id=state.wandb_run_id,
                            extra=run_info(cfg, accelerator))
    state.wandb_run_id = tracker.run_id

    def log(row: dict) -> None:
        if writer:
            writer.log(row)
        tracker.log(row)

    def save_checkpoint(acc: float | None = None):
        """acc: the test accuracy measured at this very step, which keep_best ranks by (None mid-epoch)."""
        state.epoch_sums, state.log_sums = epoch_stats.totals(accelerator), log_stats.totals(accelerator)
        state.train_seconds = train_seconds + (time.perf_counter() - epoch_start)
        rngs = gather_object([rng_state()]) if world > 1 else [rng_state()]
        path = ckpts.save(state, raw_model, optimizer.optimizer, scheduler,
                          accelerator.scaler, rngs, acc)
        accelerator.wait_for_everyone()              # no rank leaves before the main process has saved
        return path

    # FLOPs for the MFU estimate and the compile warm-up: measured before, and apart from, the training time
    probe = next(iter(train_batches.epoch(0)))
    flops = flops_per_image(raw_model, probe[0][:32])
    compile_seconds = 0.0
    if t.compile:
        compile_seconds = compile_warmup(
            model, optimizer, accelerator.scaler,
            lambda: train_step(accelerator, model, optimizer, loss_fn, [probe], t.grad_clip),
            lambda: evaluate(model, test_batches, accelerator, tta=t.tta),
            # a frozen parameter changes the graph: compile that one too, or it would compile mid-run
            phases=[lambda step=step: train_only_until(expiring, step) for step in sorted({0, *expiring.values()})])
        console.print(f"compiled in {compile_seconds:.1f}s (not counted as training time)")

    result = None
    graphs_before = compiled_graphs()
    train_seconds = state.train_seconds
    wall_start = log_start = time.perf_counter()
    log_stats = StepStats.start(accelerator.device, state.log_sums, main)   # a log window may span epochs
    lr = scheduler.base_lrs[0] * scheduler.lr_lambdas[0](max(state.step - 1, 0))  # the last step's LR
    console.start(total_steps, state.step)
    try:
        for epoch in range(state.epoch, epochs):
            model.train()
            train_only_until(expiring, state.step)       # expiring parameters stop at an epoch's start
            resumed = epoch == state.epoch and state.samples_in_epoch > 0
            skip = state.samples_in_epoch // (cfg.data.batch_size * world) if resumed else 0
            epoch_stats = StepStats.start(accelerator.device, state.epoch_sums if resumed else (0.0, 0, 0), main)
            state.epoch, state.samples_in_epoch = epoch, state.samples_in_epoch if resumed else 0
            epoch_start = time.perf_counter()
            batches_done, save_at_epoch_end, waited = skip, False, [0.0]
            batches = feed(train_batches.epoch(epoch, skip), waited, t.channels_last)
            for window in windows(batches, t.grad_accum_steps):
                batches_done += len(window)
                lr = optimizer.param_groups[0]["lr"]
                loss_sum, correct, n, grad_norm, stepped = train_step(accelerator, model, optimizer, loss_fn, window,
                                                                      t.grad_clip)
                if stepped:                                  # fp16 overflow skips a step: the schedule waits too
                    scheduler.step()
                state.step += 1
                state.samples_in_epoch += len(window) * cfg.data.batch_size * world
                epoch_stats.add(loss_sum, correct, n)
                log_stats.add(loss_sum, correct, n)
                row = None
                if state.step % t.log_every_steps == 0 or state.step == total_steps:
                    loss, correct_total, samples = log_stats.totals(accelerator)
                    row = {"step": state.step, "epoch": epoch, "lr": lr, "train/loss": loss / samples,
                           "train/acc": 100.0 * correct_total / samples,
                           "images_per_sec": samples / (time.perf_counter() - log_start)}
                    if grad_norm is not None:
                        row["grad_norm"] = grad_norm
                    log(row)
                    log_stats, log_start = StepStats.start(accelerator.device), time.perf_counter()
                console.step(state.step, row)
                stopping = stop.agreed(accelerator)
                every = cfg.checkpoint.every_steps
                due = bool(every and state.step % every == 0 and state.step < total_steps)
                if due and batches_done == len(train_batches) and not stopping:
                    save_at_epoch_end = True     # saved after this epoch's evaluation, so it is not logged twice
                elif stopping or due:
                    path = save_checkpoint()
                    if stopping:
                        if writer:
                            writer.status("stopped", step=state.step, signal=stop.name, checkpoint=path)
                        tracker.finish(EXIT_RESUMABLE)
                        # The handlers stay installed: the launcher's own SIGTERM to the other ranks (sent when
                        # the first one exits) must not turn their resumable exit into a kill.
                        raise Stopped(f"{stop.name} at step {state.step}; checkpoint {path or 'saved by rank 0'}; "
                                      f"rerun the same command to resume")
                if state.step == total_steps:
                    break
            if accelerator.device.type == "cuda":
                torch.cuda.synchronize()         # the epoch's queued kernels belong to its time
            epoch_time = time.perf_counter() - epoch_start
            train_seconds += epoch_time
            loss, correct_total, samples = epoch_stats.totals(accelerator)
            state.samples_seen += samples
            last_epoch = epoch == epochs - 1
            row = {"step": state.step, "epoch": epoch, "lr": lr, "epoch_time": epoch_time,
                   "train/epoch_loss": loss / samples, "train/epoch_acc": 100.0 * correct_total / samples,
                   "images_per_sec": samples / epoch_time, "data_wait": waited[0]}
            evaluated = (epoch + 1) % t.eval_every_epochs == 0 or last_epoch
            if evaluated:
                eval_start = time.perf_counter()
                result = evaluate(model, test_batches, accelerator, tta=t.tta, samples=16 if tracker.active else 0)
                state.eval_seconds += time.perf_counter() - eval_start
                state.best_acc = max(state.best_acc or 0.0, result.accuracy)
                if t.target_acc is not None and state.time_to_target is None and result.accuracy >= t.target_acc:
                    state.time_to_target, state.steps_to_target = train_seconds, state.step
                row.update(result.as_row())
            log(row)
            if evaluated and result.samples:
                tracker.log_eval(state.step, result.confusion, *result.samples)
            console.epoch(row)
            state.epoch, state.samples_in_epoch = epoch + 1, 0
            epoch_stats, epoch_start = StepStats.start(accelerator.device), time.perf_counter()  # saved as empty
            every = cfg.checkpoint.every_epochs
            if last_epoch or save_at_epoch_end or (every and (epoch + 1) % every == 0):
                save_checkpoint(result.accuracy if evaluated else None)
    except Stopped:
        console.stop()
        raise
    except BaseException as e:
        console.stop()
        stop.uninstall()
        if writer:
            writer.status("failed", step=state.step, error=f"{type(e).__name__}: {e}".splitlines()[0])
        tracker.finish(1)
        raise
    stop.uninstall()
    console.stop()
    # compiling inside the loop counts as training time: a graph variant the warm-up missed shows here
    graphs_in_training = compiled_graphs() - graphs_before if t.compile else None

    if result is None:                                   # resumed a run that had already finished training
        result = evaluate(model, test_batches, accelerator, tta=t.tta)
        state.best_acc = max(state.best_acc or 0.0, result.accuracy)
    summary = {
        "name": cfg.name, "output_dir": output_dir, "steps": state.step, "epochs": epochs,
        "final_test_acc": result.accuracy, "best_test_acc": state.best_acc, "final_test_loss": result.loss,
        "per_class_acc": result.per_class, "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": train_seconds, "images_per_sec": state.samples_seen / max(train_seconds, 1e-9),
        "world_size": world, "mixed_precision": t.mixed_precision, "global_batch_size": global_batch,
        "device": accelerator.device.type, "resumed_from": resume_from, "wandb_run_id": tracker.run_id,
        "tta": t.tta, "target_acc": t.target_acc, "time_to_target": state.time_to_target,
        "steps_to_target": state.steps_to_target, "data_seconds": data_seconds, "compile_seconds": compile_seconds,
        "eval_seconds": state.eval_seconds,
        "compile_mode": accelerator.state.dynamo_plugin.mode if t.compile else None,
        "graphs_compiled_in_training": graphs_in_training,
        "flops_per_image": flops, "mfu": mfu(flops, state.samples_seen, train_seconds, accelerator, t.mixed_precision),
    }
    accelerator.wait_for_everyone()
    if writer:
        writer.save_weights(raw_model)
        writer.save_summary(summary)
        writer.status("finished", step=state.step, total_steps=total_steps)
        writer.close()
    tracker.summary(summary)
    tracker.finish(0)
    console.summary(summary)
    # Ranks tear the process group down together: a rank that leaves while another still uses it can abort
    # ("terminate called without an active exception") instead of exiting cleanly.
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary
