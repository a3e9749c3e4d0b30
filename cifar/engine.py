"""The training loop on Accelerate: one CPU, one GPU or many, read top to bottom."""
from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed

from .config import Config
from .console import Console
from .data import build_batches
from .errors import UserError
from .evaluation import evaluate
from .models import build_model
from .optim import build_optimizer
from .outputs import RunWriter
from .schedule import build_scheduler


def make_accelerator(cfg: Config) -> Accelerator:
    cuda = torch.cuda.is_available()
    precision = cfg.train.mixed_precision
    if precision == "fp16" and not cuda:
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU; use bf16 or no on CPU")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UserError("train.mixed_precision=bf16 is not supported by this GPU; use fp16 or no")
    # Gradient accumulation is done by the engine (see train_step), so Accelerate's own count stays at 1.
    return Accelerator(cpu=not cuda, mixed_precision=precision)


def resolve_output_dir(cfg: Config, accelerator: Accelerator) -> str:
    """runs/<name>-<timestamp> unless given; every rank gets the main process's choice."""
    chosen = [cfg.output_dir or os.path.join("runs", f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}")]
    if accelerator.num_processes > 1:
        broadcast_object_list(chosen, from_process=0)
    return chosen[0]


@dataclass
class StepStats:
    """Running sums on the device, read (one sync) only when a row is logged."""
    loss_sum: torch.Tensor
    correct: torch.Tensor
    samples: int = 0

    @classmethod
    def zeros(cls, device):
        return cls(torch.zeros((), device=device, dtype=torch.float64), torch.zeros((), device=device,
                                                                                  dtype=torch.long))

    def add(self, loss_sum, correct, n):
        self.loss_sum += loss_sum.detach().double()
        self.correct += correct
        self.samples += n

    def totals(self, accelerator) -> tuple[float, float, int]:
        """(mean loss, accuracy %, samples) over all ranks."""
        sums = torch.stack([self.loss_sum, self.correct.double(),
                            torch.tensor(float(self.samples), device=self.loss_sum.device, dtype=torch.float64)])
        loss_sum, correct, samples = accelerator.reduce(sums, "sum").tolist()
        return loss_sum / samples, 100.0 * correct / samples, int(samples)


def train_step(accelerator, model, optimizer, loss_fn, window, grad_clip) -> tuple[torch.Tensor, torch.Tensor,
                                                                                int, float | None]:
    """One optimizer step over a window of micro-batches.

    The loss is summed over samples and the accumulated gradient divided by the window's real sample count, so a
    short last window of an epoch weighs each sample exactly as a full one does. DDP averages over ranks, which
    Accelerate keeps at equal batch sizes. Gradients synchronise only on the window's last micro-batch.
    """
    loss_total = torch.zeros((), device=accelerator.device)
    correct = torch.zeros((), device=accelerator.device, dtype=torch.long)
    n = sum(len(labels) for _, labels in window)
    for i, (images, labels) in enumerate(window):
        last = i == len(window) - 1
        with accelerator.no_sync(model) if not last else contextlib.nullcontext():
            logits = model(images)
            loss = loss_fn(logits.float(), labels)
            accelerator.backward(loss)
        loss_total += loss.detach()
        correct += (logits.argmax(1) == labels).sum()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    torch._foreach_div_(grads, float(n))
    grad_norm = None
    if grad_clip is not None:
        grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), grad_clip))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_total, correct, n, grad_norm


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
    accelerator = make_accelerator(cfg)
    main = accelerator.is_main_process
    output_dir = resolve_output_dir(cfg, accelerator)
    console = Console(enabled=main)
    console.config(cfg.to_yaml(), output_dir)
    writer = RunWriter(output_dir, cfg) if main else None

    set_seed(cfg.seed)
    train_batches, test_batches = build_batches(accelerator, cfg.data, cfg.seed)
    model = build_model(cfg.model.name)
    optimizer = build_optimizer(cfg.optim, model)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="sum", label_smoothing=cfg.train.label_smoothing)

    t = cfg.train
    steps_per_epoch = math.ceil(len(train_batches) / t.grad_accum_steps)
    total_steps = t.max_steps or t.epochs * steps_per_epoch
    epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler = build_scheduler(cfg.schedule, optimizer.optimizer, total_steps)
    world = accelerator.num_processes

    step, best_acc, result = 0, None, None
    train_seconds, samples_seen = 0.0, 0
    wall_start = time.perf_counter()
    console.start(total_steps)
    for epoch in range(epochs):
        model.train()
        epoch_stats, log_stats = StepStats.zeros(accelerator.device), StepStats.zeros(accelerator.device)
        epoch_start = log_start = time.perf_counter()
        for window in windows(train_batches.epoch(epoch), t.grad_accum_steps):
            lr = optimizer.param_groups[0]["lr"]
            loss_sum, correct, n, grad_norm = train_step(accelerator, model, optimizer, loss_fn, window, t.grad_clip)
            if not accelerator.optimizer_step_was_skipped:  # fp16 overflow: the schedule waits too
                scheduler.step()
            step += 1
            epoch_stats.add(loss_sum, correct, n)
            log_stats.add(loss_sum, correct, n)
            row = None
            if step % t.log_every_steps == 0 or step == total_steps:
                loss, acc, samples = log_stats.totals(accelerator)
                row = {"step": step, "epoch": epoch, "lr": lr, "train/loss": loss, "train/acc": acc,
                       "images_per_sec": samples / (time.perf_counter() - log_start)}
                if grad_norm is not None:
                    row["grad_norm"] = grad_norm
                if not math.isfinite(row["train/loss"]):
                    raise UserError(f"training diverged: loss is {row['train/loss']} at step {step}; lower optim.lr "
                                    f"or set train.grad_clip")
                if writer:
                    writer.log(row)
                log_stats, log_start = StepStats.zeros(accelerator.device), time.perf_counter()
            console.step(step, row)
            if step == total_steps:
                break
        epoch_time = time.perf_counter() - epoch_start
        train_seconds += epoch_time
        loss, acc, samples = epoch_stats.totals(accelerator)
        samples_seen += samples
        last_epoch = epoch == epochs - 1
        row = {"step": step, "epoch": epoch, "lr": lr, "epoch_time": epoch_time, "train/epoch_loss": loss,
               "train/epoch_acc": acc, "images_per_sec": samples / epoch_time}
        if (epoch + 1) % t.eval_every_epochs == 0 or last_epoch:
            result = evaluate(model, test_batches, accelerator)
            best_acc = max(best_acc or 0.0, result.accuracy)
            row.update(result.as_row())
        if writer:
            writer.log(row)
        console.epoch(row)

    summary = {
        "name": cfg.name, "output_dir": output_dir, "steps": step, "epochs": epochs,
        "final_test_acc": result.accuracy, "best_test_acc": best_acc, "final_test_loss": result.loss,
        "per_class_acc": result.per_class, "wall_seconds": time.perf_counter() - wall_start,
        "train_seconds": train_seconds, "images_per_sec": samples_seen / train_seconds,
        "world_size": world, "mixed_precision": t.mixed_precision,
        "global_batch_size": cfg.data.batch_size * world * t.grad_accum_steps,
        "device": accelerator.device.type,
    }
    accelerator.wait_for_everyone()
    if writer:
        writer.save_weights(accelerator.unwrap_model(model))
        writer.save_summary(summary)
        writer.close()
    console.summary(summary)
    accelerator.end_training()
    return summary
