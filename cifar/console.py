"""What a person watches: live bars and an epoch table on a terminal, plain log lines (cifar/log.py, level info) in
batch logs. Main process only."""
from __future__ import annotations

import sys

from rich.console import Console as RichConsole
from rich.console import Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.syntax import Syntax
from rich.table import Table

from . import log

EPOCH_COLUMNS = [("epoch", "epoch", "{}"), ("step", "step", "{}"), ("train loss", "train/epoch_loss", "{:.4f}"),
                 ("train acc", "train/epoch_acc", "{:.2f}"), ("test loss", "test/loss", "{:.4f}"),
                 ("test acc", "test/acc", "{:.2f}"), ("lr", "lr", "{:.3g}"), ("img/s", "images_per_sec", "{:.0f}"),
                 ("time", "epoch_time", "{:.1f}s")]


def cell(value, fmt: str = "{}") -> str:
    """A table cell: the value formatted, or "-" where there is none."""
    return "-" if value is None else fmt.format(value)


class Console:
    def __init__(self, enabled: bool, ema: bool = False):
        self.enabled = enabled and log.enabled()   # --log-level warning: no progress, no epoch lines
        self.columns = EPOCH_COLUMNS + ([("ema acc", "test/ema_acc", "{:.2f}")] if ema else [])
        self.rich = RichConsole(stderr=False)
        self.interactive = self.enabled and self.rich.is_terminal
        self.live = None
        self.table = None

    def print(self, text: str):
        if self.interactive:
            self.rich.print(text, soft_wrap=True)
        elif self.enabled:
            log.info(text)   # batch logs: whole lines, never wrapped or cut

    def config(self, yaml_text: str, output_dir: str):
        if not self.enabled:
            return
        if self.interactive:
            self.rich.print(Syntax(yaml_text, "yaml", theme="ansi_dark", background_color="default"))
        else:
            log.info(yaml_text.rstrip("\n"))
        self.print(f"run folder: {output_dir}")

    def start(self, total_steps: int, first_step: int = 0):
        if not self.interactive:
            return
        self.table = Table(*(c[0] for c in self.columns), title="epochs", title_justify="left")
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=self.rich)
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="")
        self.live = Live(Group(self.table, self.progress), console=self.rich, refresh_per_second=4)
        self.live.start()

    def step(self, step: int, row: dict | None):
        """Called every optimizer step; `row` is the logged metrics when this step was logged."""
        if not self.enabled:
            return
        if self.live:
            info = f"loss {row['train/loss']:.4f}  lr {row['lr']:.3g}" if row else None
            self.progress.update(self.task, completed=step, **({"info": info} if info else {}))
        elif row:
            log.info(f"step {step} epoch {row['epoch']} loss {row['train/loss']:.4f} acc {row['train/acc']:.2f} "
                     f"lr {row['lr']:.4g} {row['images_per_sec']:.0f} img/s")

    def epoch(self, row: dict):
        if not self.enabled:
            return
        cells = [cell(row.get(key), fmt) for _, key, fmt in self.columns]
        if self.live:
            self.table.add_row(*cells)
        else:
            pairs = zip(self.columns[1:], cells[1:])
            log.info(f"epoch {cells[0]}  " + "  ".join(f"{name.replace(' ', '_')}={cell}"
                                                      for (name, _, _), cell in pairs))

    def stop(self):
        if self.live:
            self.live.stop()
            self.live = None

    def summary(self, summary: dict):
        if not self.enabled:
            return
        self.stop()
        rows = [(key, f"{v:.2f}" if isinstance(v := summary.get(key), float) else str(v))
                for key in ("final_test_acc", "best_test_acc", "best_ema_test_acc", "wall_seconds", "train_seconds",
                            "images_per_sec", "world_size", "mixed_precision", "output_dir")
                if key != "best_ema_test_acc" or summary.get(key) is not None]
        if not self.interactive:
            log.info("summary " + "  ".join(f"{k}={v}" for k, v in rows))
            return
        table = Table(title="summary", show_header=False, title_justify="left")
        for row in rows:
            table.add_row(*row)
        self.rich.print(table)
        sys.stdout.flush()
