"""Many trainings from one W&B sweep file: here (one after another, or N at once), as a SLURM job array, or under
`wandb agent`.

    cifar-sweep debug-lr-seed --dry-run       # a shipped sweep: the runs it will make, and their state
    cifar-sweep debug-lr-seed [--parallel 2]  # make them; rerun: skip and resume
    cifar-sweep my-sweep.yaml --slurm         # a file (python -m cifar.sweep too): the sbatch line of the array
    wandb sweep configs/sweeps/debug-lr-seed.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID

The file is a W&B sweep configuration (method grid or random, parameters named as config keys: `optim.lr`, `seed`,
or nested as W&B allows); its `command` names the recipe (`--config X`: a shipped name or a file) and passes the
parameters with ${args_no_hyphens} or ${args}. Run i of the list goes to RUNS_DIR/<sweep name>/<i>-<key=value,...>/,
in the W&B group named after the sweep and tagged with its parameters. Random search draws its points from --seed,
so the list is the same every time. A rerun skips finished runs and resumes interrupted ones from their checkpoints.
Two sweeps of one file (two terminals, two machines on a shared disk) share the work: a run whose folder the other
holds is skipped as "running elsewhere", one it finished as "ran elsewhere"; none runs twice.
"""
from __future__ import annotations

import argparse
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterable, Iterator

from . import log, precedence, run_folder
from .config import flatten, load_config, load_saved_config
from .errors import EXIT_RESUMABLE, UserError, cli, shorten, warn
from .run_folder import CONFIG, FINISHED, RUNNING, STATUS, describe_holder, holder, read_summary
from .shipped import sweep_path
from .sweep_plan import PlannedRun, Sweep, plan, read_sweep

# A run is train.py's command (cifar-train) in a process of its own, from the package this sweep runs from: no
# checkout's train.py needed (an installed wheel has none)
TRAIN = [sys.executable, "-m", "cifar.train_cli"]
LISTED = 1000   # rows of --dry-run's table and of the summary: a bigger sweep's others are counted, not listed


# ----------------------------------------------------------------------------- state of a run folder

def run_state(run: PlannedRun) -> str:
    """The run folder's state (cifar/run_folder.py): new, running, stopped, finished, failed, save-failed, killed."""
    return run_folder.state(run.folder)


def elsewhere(run: PlannedRun) -> tuple[str, str] | None:
    """(outcome, detail) when another process (another sweep of this file) holds the run or finished it meanwhile;
    None when it is this sweep's to run."""
    now = run_state(run)
    if now == RUNNING:
        return "running elsewhere", f"held by {describe_holder(holder(run.folder))}"
    if now == FINISHED:
        return "ran elsewhere", "finished by another process while this sweep ran"
    return None


def changed(run: PlannedRun, sweep: Sweep) -> str | None:
    """How a finished run's saved config differs from what the sweep asks for now (None: the same)."""
    try:
        saved = flatten(load_saved_config(os.path.join(run.folder, CONFIG)).to_dict(), ".")
        overrides = run.args[2 if sweep.recipe else 0:]
        # as the run's train.py resolves it: its environment is this process's (child_env)
        wanted, _ = precedence.resolve(load_config(sweep.recipe, overrides), precedence.given_keys(overrides))
        wanted = flatten(wanted.to_dict(), ".")
    except UserError:
        return "its config.yaml cannot be read"
    diff = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    return ", ".join(f"{k}: {shorten(saved.get(k))} -> {shorten(wanted.get(k))}" for k in diff[:3]) or None


def best_acc(run: PlannedRun) -> str:
    try:
        return f"{(read_summary(run.folder) or {})['best_test_acc']:.2f}"
    except (KeyError, TypeError, ValueError):
        return "-"


# ----------------------------------------------------------------------------- running

def gpu_ids(environ=os.environ) -> list[str]:
    """The GPUs this machine shows (CUDA_VISIBLE_DEVICES, else the NVIDIA driver's list), without importing torch."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [g for g in visible.split(",") if g.strip() and g.strip() != "NoDevFiles"]
    try:
        return [str(i) for i in range(len(os.listdir("/proc/driver/nvidia/gpus")))]
    except OSError:
        return []


def child_env(slot: int, parallel: int, environ=os.environ, cores: int | None = None) -> dict:
    """A run's environment when `parallel` run at once: its share of the CPU cores (OMP_NUM_THREADS, unless set)
    and, with GPUs, one of them (slot i takes GPU i mod G)."""
    env = dict(environ)
    if parallel > 1:
        cores = cores or os.cpu_count() or 1
        env.setdefault("OMP_NUM_THREADS", str(max(1, cores // parallel)))
        gpus = gpu_ids(environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    return env


class Runner:
    """Runs the sweep's runs as train.py processes, `parallel` at a time, taking each from `runs` only when a slot is
    free (a lazy plan stays lazy) and skipping any that another process holds or has finished by the time its turn
    comes. A run whose config does not check fails without starting. SIGINT/SIGTERM: the running ones save a
    checkpoint and stop (a rerun resumes them), and no new one starts."""

    def __init__(self, runs: Iterable[PlannedRun], parallel: int, log_dir: str | None):
        self.runs, self.parallel, self.log_dir = runs, parallel, log_dir
        self.stopping = False
        self.left_runs = False
        self.active: dict[int, tuple[PlannedRun, subprocess.Popen, float]] = {}   # slot -> (run, process, start)
        self.last_error: dict[int, str] = {}                               # index -> its last `error:` line
        self.relays: dict[int, threading.Thread] = {}
        self.results: dict[int, tuple[str, str]] = {}                      # index -> (outcome, detail)

    def _signal(self, signum, frame) -> None:
        if not self.stopping:
            print(f"sweep: {signal.Signals(signum).name} received: the running runs save a checkpoint and stop; "
                  f"rerun the same command to go on", file=sys.stderr, flush=True)
        self.stopping = True
        for _, proc, _ in self.active.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> dict[int, tuple[str, str]]:
        old = {s: signal.signal(s, self._signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            queue = iter(self.runs)
            exhausted = False
            while (not exhausted and not self.stopping) or self.active:
                while not exhausted and not self.stopping and len(self.active) < self.parallel:
                    run = self._next(queue)     # taken only when a slot is free: its state is read now
                    if run is None:
                        exhausted = True
                    elif not self._skip_if_elsewhere(run):
                        slot = min(set(range(self.parallel)) - set(self.active))
                        self.active[slot] = self._start(run, slot)
                self._reap()
            self.left_runs = not exhausted   # stopped before every run had been taken
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        return self.results

    def _next(self, queue: Iterator[PlannedRun]) -> PlannedRun | None:
        """The next run that can start; one whose config does not check is failed here, never started."""
        for run in queue:
            if not run.problem:
                return run
            self._record(run, "failed (config)", run.problem)
        return None

    def _skip_if_elsewhere(self, run: PlannedRun) -> bool:
        found = elsewhere(run)
        if found:
            self._record(run, *found)
        return found is not None

    def _record(self, run: PlannedRun, outcome: str, detail: str) -> None:
        self.results[run.index] = (outcome, detail)
        log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: {outcome}" +
                 (f": {detail}" if detail else ""))

    def _start(self, run: PlannedRun, slot: int):
        log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: starting")
        command = [*TRAIN, *run.args]
        if self.log_dir:  # several at once: each to its own log
            os.makedirs(self.log_dir, exist_ok=True)
            with open(self._log(run), "ab") as out:
                proc = subprocess.Popen(command, env=child_env(slot, self.parallel), stdout=out,
                                        stderr=subprocess.STDOUT)
        else:  # one at a time: on this terminal; stderr passes through here to keep the run's error line
            proc = subprocess.Popen(command, env=child_env(slot, self.parallel), stderr=subprocess.PIPE, text=True)
            self.relays[run.index] = threading.Thread(target=self._relay, args=(run, proc.stderr), daemon=True)
            self.relays[run.index].start()
        return run, proc, time.monotonic()

    def _log(self, run: PlannedRun) -> str:
        return os.path.join(self.log_dir, f"{os.path.basename(run.folder)}.log")

    def _relay(self, run: PlannedRun, stream) -> None:
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("error: "):
                self.last_error[run.index] = line[7:].strip()

    def _error_line(self, run: PlannedRun) -> str:
        """The run's own `error:` line: from status.json, else its log or stderr."""
        if run_folder.failure(run.folder):
            return run_folder.failure(run.folder)
        if self.log_dir and os.path.exists(self._log(run)):
            with open(self._log(run), errors="replace") as f:
                lines = [line[7:].strip() for line in f if line.startswith("error: ")]
            return lines[-1] if lines else ""
        return self.last_error.get(run.index, "")

    def _reap(self) -> None:
        time.sleep(0.2)
        for slot, (run, proc, start) in list(self.active.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.active[slot]
            took = f"{time.monotonic() - start:.1f}s"
            if code == 0:
                outcome, detail = "finished", took
            elif code == EXIT_RESUMABLE:
                outcome, detail = "stopped", f"checkpoint saved after {took}; rerun to resume"
            elif (found := elsewhere(run)) is not None:   # refused: another sweep's train.py took it first
                outcome, detail = found
            else:
                if run.index in self.relays:
                    self.relays.pop(run.index).join(10)  # it has read the run's last line
                why = self._error_line(run) or (f"killed by {signal.Signals(-code).name}" if code < 0 else "")
                outcome, detail = f"failed (exit {code})", why
            self._record(run, outcome, detail)


# ----------------------------------------------------------------------------- command line

def _table(rows: list[tuple], header: tuple) -> None:
    from rich.console import Console
    from rich.table import Table

    from rich.markup import escape

    table = Table(*header, title_justify="left")
    for row in rows:
        table.add_row(*(escape(str(cell)) for cell in row))  # wandb.tags=[...] is not markup
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def slurm_line(sweep: Sweep, n: int, parallel: int | None, extra: list[str]) -> str:
    throttle = f"%{parallel}" if parallel else ""
    return " ".join(["mkdir -p runs && sbatch", f"--array=0-{n - 1}{throttle}", "slurm/sweep.sbatch", sweep.path,
                     *extra])


@cli
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cifar.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep", metavar="SWEEP.yaml",
                        help="a W&B sweep file, or a shipped sweep's name (debug-lr-seed: cifar/recipes/sweeps/)")
    parser.add_argument("--dry-run", action="store_true", help="list the runs, their folders and state; run nothing")
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="runs at once (each with its share of the CPU cores, and a GPU of its own when there "
                             "are several); with --slurm, the array's %%N limit")
    parser.add_argument("--runs-dir", default="runs", help="where the sweep's folder goes (default: runs)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random search's draws (default: 0)")
    parser.add_argument("--index", type=int, help="only run number I of the list (what a SLURM array task runs)")
    parser.add_argument("--print-args", action="store_true",
                        help="with --index: print that run's train.py arguments, one per line, and exit")
    parser.add_argument("--slurm", action="store_true", help="print the sbatch command of the SLURM array and exit")
    args = parser.parse_args(argv)

    sweep = read_sweep(sweep_path(args.sweep))
    runs = plan(sweep, args.runs_dir, args.seed)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise UserError(f"run index {args.index} is outside this sweep's runs 0..{len(runs) - 1}; check "
                            f"--array (python -m cifar.sweep {sweep.path} --slurm prints it)")
        runs = [runs[args.index]]
        if runs[0].problem:
            raise UserError(runs[0].problem)
    elif args.print_args:
        raise UserError("--print-args needs --index I (the run whose arguments to print)")
    if args.print_args:
        print("\n".join(runs[0].args))
        return
    if args.slurm:
        extra = [f"--{k.replace('_', '-')}={v}" for k, v in (("runs_dir", args.runs_dir), ("seed", args.seed))
                 if v != parser.get_default(k)]
        if args.parallel != 1 and not 1 <= args.parallel <= len(runs):
            raise UserError(f"--parallel {args.parallel}: the array has {len(runs)} tasks; give 1..{len(runs)}")
        print(slurm_line(sweep, len(runs), args.parallel if args.parallel > 1 else None, extra))
        return
    cores = os.cpu_count() or 1
    if not 1 <= args.parallel <= len(runs):
        raise UserError(f"--parallel {args.parallel}: this sweep has {len(runs)} run(s); give 1..{len(runs)}")
    if args.parallel > cores:
        raise UserError(f"--parallel {args.parallel}: this machine has {cores} CPU core(s) and each run needs one; "
                        f"give at most {cores}, or run the sweep as a SLURM array (--slurm)")

    if args.dry_run:
        print(f"sweep {sweep.name}: {len(runs)} run(s), method {sweep.method}, recipe {sweep.recipe or '(defaults)'}")
        listed = list(itertools.islice(runs, LISTED))
        _table([(r.index, r.folder, "bad config" if r.problem else run_state(r), " ".join(r.args)) for r in listed],
               ("#", "folder", "state", "train.py arguments"))
        for run in listed:
            if run.problem:
                warn(run.problem)
        _unlisted(len(runs) - len(listed), sweep)
        return
    skipped: dict[int, str] = {}   # index -> its state, for the runs finished before or running elsewhere
    log_dir = os.path.join(args.runs_dir, sweep.name, "logs") if args.parallel > 1 else None
    runner = Runner(_to_run(runs, sweep, skipped, time.time()), args.parallel, log_dir)
    results = runner.run()
    rows = []
    for run in itertools.islice(runs, LISTED):
        outcome, detail = _outcome(run, results, skipped)
        rows.append((run.index, os.path.basename(run.folder), outcome, best_acc(run), detail[:100]))
    _table(rows, ("#", "run", "outcome", "best test acc", "detail"))
    _unlisted(len(runs) - len(rows), sweep)
    print(f"compare them: python -m cifar.compare {os.path.join(args.runs_dir, sweep.name)}")
    if any(o.startswith("failed") for o, _ in results.values()):
        sys.exit(1)
    if runner.left_runs or any(o == "stopped" for o, _ in results.values()):
        sys.exit(EXIT_RESUMABLE)


def _to_run(runs: Iterable[PlannedRun], sweep: Sweep, skipped: dict[int, str], since: float) -> Iterator[PlannedRun]:
    """The runs to start, each looked at when the runner asks for it: those finished before `since` (this sweep's
    start) are skipped and recorded in `skipped`; the runner skips one that another process holds, or finished
    meanwhile ("ran elsewhere"), when its turn comes."""
    for run in runs:
        if run_state(run) == FINISHED and os.path.getmtime(os.path.join(run.folder, STATUS)) < since:
            why = changed(run, sweep)
            if why:
                warn(f"sweep: run {run.index} finished with another config ({why}); kept as it is: move "
                     f"{run.folder} away to run it again")
            log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: finished before, skipped")
            skipped[run.index] = FINISHED
        else:
            yield run      # the runner skips it if another process holds it when its turn comes


def _outcome(run: PlannedRun, results: dict[int, tuple[str, str]], skipped: dict[int, str]) -> tuple[str, str]:
    if run.index in results:
        return results[run.index]
    if run.index in skipped:
        return f"{skipped[run.index]} (skipped)", ""
    return "not started", "the sweep was stopped"   # the runner never took it


def _unlisted(more: int, sweep: Sweep) -> None:
    if more > 0:
        print(f"... and {more:,} more run(s), not listed (python -m cifar.sweep {sweep.path} --index I --print-args "
              f"shows run I)")


if __name__ == "__main__":
    main()
