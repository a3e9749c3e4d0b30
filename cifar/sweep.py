"""Many trainings from one W&B sweep file: here (one after another, or N at once), as a SLURM job array, or under
`wandb agent`.

    python -m cifar.sweep configs/sweeps/debug-lr-seed.yaml --dry-run       # the runs it will make, and their state
    python -m cifar.sweep configs/sweeps/debug-lr-seed.yaml [--parallel 2]  # make them; rerun: skip and resume
    python -m cifar.sweep configs/sweeps/debug-lr-seed.yaml --slurm         # print the sbatch line of the array
    wandb sweep configs/sweeps/debug-lr-seed.yaml && wandb agent ENTITY/PROJECT/SWEEP_ID

The file is a W&B sweep configuration (method grid or random, parameters named as config keys: `optim.lr`, `seed`,
or nested as W&B allows); its `command` names the recipe (`--config configs/X.yaml`) and passes the parameters with
${args_no_hyphens} or ${args}. Run i of the list goes to RUNS_DIR/<sweep name>/<i>-<key=value,...>/, in the W&B group
named after the sweep and tagged with its parameters. Random search draws its points from --seed, so the list is
the same every time. A rerun skips finished runs and resumes interrupted ones from their checkpoints.
"""
from __future__ import annotations

import argparse
import fcntl
import itertools
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from .config import flatten, load_config, load_saved_config, parse_overrides
from . import log
from .errors import EXIT_RESUMABLE, UserError, cli, warn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# What W&B accepts at the top of a sweep file (its schema refuses anything else)
TOP_KEYS = ("apiVersion", "kind", "controller", "description", "program", "job", "image_uri", "entity", "project",
            "method", "command", "name", "run_cap", "metric", "metrics", "scheduler", "early_terminate", "parameters")
# The argument macros whose output train.py parses: `key=value` and `--key=value` (and `--key value`)
ARG_MACROS = ("${args}", "${args_no_hyphens}", "${args_no_equals}")
OTHER_MACROS = ("${env}", "${interpreter}", "${program}")
DISTRIBUTIONS = {  # name -> the keys it needs
    "constant": ("value",), "categorical": ("values",), "int_uniform": ("min", "max"), "uniform": ("min", "max"),
    "q_uniform": ("min", "max"), "log_uniform": ("min", "max"), "log_uniform_values": ("min", "max"),
    "q_log_uniform_values": ("min", "max"), "normal": ("mu", "sigma"), "q_normal": ("mu", "sigma"),
    "log_normal": ("mu", "sigma")}
SPEC_KEYS = {"value", "values", "distribution", "min", "max", "mu", "sigma", "q", "probabilities"}


@dataclass
class Sweep:
    path: str
    name: str
    method: str
    recipe: str | None                       # --config in the command; None: the defaults (the tutorial)
    fixed: list[str]                         # other overrides written in the command
    parameters: dict[str, dict]              # dotted config key -> W&B parameter spec
    run_cap: int | None = None
    project: str | None = None
    entity: str | None = None


@dataclass
class Run:
    index: int
    params: dict[str, Any]                   # dotted config key -> value
    folder: str
    args: list[str] = field(default_factory=list)   # train.py's command line after `train.py`


# ----------------------------------------------------------------------------- the file

def read_sweep(path: str) -> Sweep:
    """A sweep file -> Sweep, refusing what W&B would refuse and what this runner cannot run."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except FileNotFoundError:
        raise UserError(f"sweep file {path} not found; pass one such as configs/sweeps/debug-lr-seed.yaml")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read sweep file {path} ({getattr(e, 'strerror', None) or e}); pass a YAML file")
    except yaml.YAMLError as e:
        line = getattr(getattr(e, "problem_mark", None), "line", None)
        raise UserError(f"sweep file {path} is not valid YAML{'' if line is None else f' at line {line + 1}'}")
    if not isinstance(raw, dict):
        raise UserError(f"sweep file {path} must be a mapping (method, parameters, command...)")
    where = f"sweep file {path}"
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{where}: W&B refuses the key '{unknown[0]}'; allowed: {', '.join(TOP_KEYS)} (the recipe "
                        f"goes in command: [..., --config, configs/X.yaml, ${{args_no_hyphens}}])")
    method = raw.get("method")
    if method not in ("grid", "random", "bayes", "custom"):
        raise UserError(f"{where}: method must be grid, random or bayes (W&B requires it); got {method!r}")
    if method in ("bayes", "custom"):
        raise UserError(f"{where}: method {method} is run by W&B's server: start it with `wandb sweep {path}` and "
                        f"`wandb agent`; here use method: grid or random")
    program = raw.get("program", "train.py")
    if not isinstance(program, str) or os.path.basename(program) != "train.py":
        raise UserError(f"{where}: program must be train.py; got {program!r}")
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name) or name.startswith("."):
        raise UserError(f"{where}: name {name!r} becomes a folder name: use letters, digits and . _ + - only")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise UserError(f"{where}: run_cap must be a positive integer (W&B requires it); got {run_cap!r}")
    if method == "random" and run_cap is None:
        raise UserError(f"{where}: method random needs run_cap here (how many points to draw; W&B's agent would "
                        f"draw until stopped)")
    recipe, fixed = _read_command(raw.get("command"), where)
    parameters = raw.get("parameters")
    if not isinstance(parameters, dict) or not parameters:
        raise UserError(f"{where}: parameters must map config keys to values, e.g. optim.lr: {{values: [0.01, 0.1]}}")
    specs = _flat_parameters(parameters, where)
    for key, spec in specs.items():
        _check_spec(key, spec, method, where)
    for key in ("project", "entity"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise UserError(f"{where}: {key} must be a string; got {raw[key]!r}")
    return Sweep(path, name, method, recipe, fixed, specs, run_cap, raw.get("project"), raw.get("entity"))


def _read_command(command, where: str) -> tuple[str | None, list[str]]:
    """The recipe (--config X) and fixed overrides of a W&B `command`; refuses one whose parameters never reach
    train.py. No command: W&B's default (${env} ${interpreter} ${program} ${args}), the default recipe."""
    if command is None:
        return None, []
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise UserError(f"{where}: command must be a list, e.g. [${{env}}, ${{interpreter}}, ${{program}}, --config, "
                        f"configs/debug.yaml, ${{args_no_hyphens}}]")
    words = [str(c) for c in command]
    macros = [w for w in words if w.startswith("${")]
    odd = [m for m in macros if m not in ARG_MACROS + OTHER_MACROS]
    if odd:
        raise UserError(f"{where}: train.py cannot read {odd[0]} in command; use ${{args_no_hyphens}} or ${{args}}")
    if not any(m in ARG_MACROS for m in macros):
        raise UserError(f"{where}: command never passes the parameters to train.py; add ${{args_no_hyphens}} "
                        f"(or ${{args}})")
    rest = [w for w in words if not w.startswith("${")]
    if any(os.path.basename(w) in ("python", "python3", "train.py") for w in rest):
        raise UserError(f"{where}: write ${{interpreter}} ${{program}} in command rather than python or train.py")
    recipe, fixed, i = None, [], 0
    while i < len(rest):
        if rest[i] == "--config" and i + 1 < len(rest):
            recipe, i = rest[i + 1], i + 2
            continue
        if rest[i].startswith("--config="):
            recipe = rest[i].split("=", 1)[1]
        else:
            fixed.append(rest[i])
        i += 1
    parse_overrides(fixed)  # one line for a malformed one, before anything runs
    return recipe, fixed


def _flat_parameters(parameters: dict, where: str, prefix: str = "") -> dict[str, dict]:
    """W&B's nested form (`optim: {parameters: {lr: ...}}`) and the dotted one (`optim.lr: ...`) -> dotted keys."""
    out = {}
    for key, spec in parameters.items():
        if not isinstance(spec, dict):
            raise UserError(f"{where}: parameter {prefix}{key} must be a mapping such as {{values: [...]}} or "
                            f"{{value: ...}}; got {spec!r}")
        if "parameters" in spec:
            if set(spec) != {"parameters"} or not isinstance(spec["parameters"], dict) or not spec["parameters"]:
                raise UserError(f"{where}: nested parameter {prefix}{key} must hold only a non-empty 'parameters'")
            out.update(_flat_parameters(spec["parameters"], where, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = spec
    return out


def _check_spec(key: str, spec: dict, method: str, where: str) -> None:
    unknown = set(spec) - SPEC_KEYS
    if unknown:
        raise UserError(f"{where}: parameter {key} has {sorted(unknown)[0]!r}, which W&B does not know; use value, "
                        f"values, or distribution with min/max (or mu/sigma)")
    dist = _distribution(spec)
    if dist not in DISTRIBUTIONS:
        raise UserError(f"{where}: parameter {key}: distribution {dist!r} is not one of {', '.join(DISTRIBUTIONS)}")
    missing = [k for k in DISTRIBUTIONS[dist] if k not in spec]
    if missing:
        raise UserError(f"{where}: parameter {key}: distribution {dist} needs {' and '.join(missing)}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise UserError(f"{where}: parameter {key}: values must be a non-empty list; an empty grid makes no runs")
    if method == "grid" and dist not in ("constant", "categorical"):
        raise UserError(f"{where}: parameter {key} has distribution {dist}: a grid needs values (or value) for every "
                        f"parameter; use method: random to draw from a distribution")
    for a, b in (("min", "max"),):
        if a in spec and not (_number(spec[a]) and _number(spec[b]) and spec[a] < spec[b]):
            raise UserError(f"{where}: parameter {key}: min and max must be numbers with min < max; got "
                            f"{spec[a]!r}, {spec[b]!r}")
    if dist == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise UserError(f"{where}: parameter {key}: int_uniform needs integer min and max")
    if dist in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
        raise UserError(f"{where}: parameter {key}: {dist} needs min > 0")
    if "probabilities" in spec:
        p = spec["probabilities"]
        if not isinstance(p, list) or len(p) != len(spec.get("values", [])) or not math.isclose(sum(p), 1.0):
            raise UserError(f"{where}: parameter {key}: probabilities must be one per value and sum to 1")


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _distribution(spec: dict) -> str:
    """W&B's default when none is written: values -> categorical, value -> constant, min/max -> int_uniform when
    both are integers, else uniform."""
    if "distribution" in spec:
        return spec["distribution"]
    if "values" in spec:
        return "categorical"
    if "value" in spec:
        return "constant"
    if isinstance(spec.get("min"), int) and isinstance(spec.get("max"), int):
        return "int_uniform"
    return "uniform"


# ----------------------------------------------------------------------------- the list of runs

def expand(sweep: Sweep, seed: int = 0) -> list[dict[str, Any]]:
    """The points of the sweep, in order: the grid's product (first parameter slowest, as written), or run_cap draws
    from random.Random(seed). The first N points stay the same when run_cap grows."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        choices = [sweep.parameters[k]["values"] if "values" in sweep.parameters[k] else [sweep.parameters[k]["value"]]
                   for k in keys]
        points = [dict(zip(keys, combo)) for combo in itertools.product(*choices)]
        return points[:sweep.run_cap] if sweep.run_cap else points
    rng = random.Random(seed)
    return [{k: _draw(sweep.parameters[k], rng) for k in keys} for _ in range(sweep.run_cap)]


def _draw(spec: dict, rng: random.Random):
    dist = _distribution(spec)
    if dist == "constant":
        return spec["value"]
    if dist == "categorical":
        return rng.choices(spec["values"], weights=spec.get("probabilities"))[0]
    if dist == "int_uniform":
        return rng.randint(spec["min"], spec["max"])
    if dist in ("normal", "q_normal", "log_normal"):
        x = rng.gauss(spec["mu"], spec["sigma"])
        x = math.exp(x) if dist == "log_normal" else x
    else:
        lo, hi = spec["min"], spec["max"]
        if dist in ("log_uniform_values", "q_log_uniform_values"):
            lo, hi = math.log(lo), math.log(hi)
        x = rng.uniform(lo, hi)
        x = math.exp(x) if "log" in dist else x
    x = float(f"{x:.6g}")  # six digits: readable in folder names and tags, and finer than any lr matters
    if "q" in spec or dist.startswith("q_"):
        q = spec.get("q", 1)
        x = round(round(x / q) * q, 10)
        return int(x) if isinstance(q, int) and float(x).is_integer() else x
    return x


def varying(sweep: Sweep, points: list[dict]) -> list[str]:
    """The parameters whose value changes from run to run: they name the run folders and tag the W&B runs."""
    return [k for k in sweep.parameters if len({json.dumps(p[k], sort_keys=True) for p in points}) > 1]


def show(value) -> str:
    """A parameter value as it appears in folder names and tags: short, and the same for the same value."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def arg(key: str, value) -> str:
    """key=value that train.py reads back as the same value and type (YAML flow, one line)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()
    return f"{key}={text.removesuffix(chr(10) + '...')}"  # a scalar document ends in "\n..."


def plan(sweep: Sweep, runs_dir: str, seed: int = 0) -> list[Run]:
    """Every run of the sweep with its folder and train.py arguments, each config checked before any run starts."""
    points = expand(sweep, seed)
    if not points:
        raise UserError(f"sweep {sweep.path} makes no runs; give every parameter at least one value")
    names = varying(sweep, points)
    width = max(2, len(str(len(points) - 1)))
    base = load_config(sweep.recipe, sweep.fixed)
    fixed_keys = {k for k, _ in parse_overrides(sweep.fixed)}
    runs = []
    for i, point in enumerate(points):
        label = ",".join(f"{k}={show(point[k])}" for k in names) or "run"
        label = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)[:120]
        folder = os.path.join(runs_dir, sweep.name, f"{i:0{width}d}-{label}")
        args = (["--config", sweep.recipe] if sweep.recipe else []) + list(sweep.fixed)
        args += [arg(k, v) for k, v in point.items()]
        if "wandb.group" not in fixed_keys | set(point):
            args.append(arg("wandb.group", sweep.name))
        for key, value in (("wandb.project", sweep.project), ("wandb.entity", sweep.entity)):
            if value and key not in fixed_keys | set(point):
                args.append(arg(key, value))
        args.append(arg("wandb.tags", list(base.wandb.tags) + [f"{k}={show(point[k])}" for k in names]))
        args.append(arg("output_dir", folder))
        try:
            load_config(sweep.recipe, args[2 if sweep.recipe else 0:])
        except UserError as e:
            raise UserError(f"sweep {sweep.path}, run {i} ({label}): {e}") from None
        runs.append(Run(i, point, folder, args))
    return runs


# ----------------------------------------------------------------------------- state of a run folder

def state(run: Run) -> str:
    """new | finished | failed | stopped | running | interrupted (killed: resumes from its newest checkpoint)."""
    try:
        with open(os.path.join(run.folder, "status.json")) as f:
            status = json.load(f)
    except (OSError, ValueError):
        return "new" if not os.path.isdir(os.path.join(run.folder, "checkpoints")) else "interrupted"
    s = status.get("state")
    if s == "running":  # a kill leaves "running": is the lock still held?
        return "running" if _locked(run.folder) else "interrupted"
    return s if s in ("finished", "failed", "stopped") else "interrupted"


def _locked(folder: str) -> bool:
    try:
        fd = os.open(os.path.join(folder, ".lock"), os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def changed(run: Run, sweep: Sweep) -> str | None:
    """How a finished run's saved config differs from what the sweep asks for now (None: the same)."""
    try:
        saved = flatten(load_saved_config(os.path.join(run.folder, "config.yaml")).to_dict(), ".")
        wanted = flatten(load_config(sweep.recipe, run.args[2 if sweep.recipe else 0:]).to_dict(), ".")
    except UserError:
        return "its config.yaml cannot be read"
    diff = [k for k in sorted(set(saved) | set(wanted)) if saved.get(k) != wanted.get(k)]
    return ", ".join(f"{k}: {saved.get(k)!r} -> {wanted.get(k)!r}" for k in diff[:3]) or None


def best_acc(run: Run) -> str:
    try:
        with open(os.path.join(run.folder, "summary.json")) as f:
            return f"{json.load(f)['best_test_acc']:.2f}"
    except (OSError, ValueError, KeyError, TypeError):
        return "-"


def failure(run: Run) -> str:
    """The error line train.py left in status.json, if any."""
    try:
        with open(os.path.join(run.folder, "status.json")) as f:
            return str(json.load(f).get("error") or "")
    except (OSError, ValueError):
        return ""


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
    """Runs the sweep's runs as train.py processes, `parallel` at a time. SIGINT/SIGTERM: the running ones save a
    checkpoint and stop (a rerun resumes them), and no new one starts."""

    def __init__(self, runs: list[Run], parallel: int, log_dir: str | None):
        self.runs, self.parallel, self.log_dir = runs, parallel, log_dir
        self.stopping = False
        self.active: dict[int, tuple[Run, subprocess.Popen, float]] = {}   # slot -> (run, process, start)
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
            queue = list(self.runs)
            while (queue and not self.stopping) or self.active:
                while queue and not self.stopping and len(self.active) < self.parallel:
                    slot = min(set(range(self.parallel)) - set(self.active))
                    self.active[slot] = self._start(queue.pop(0), slot)
                self._reap()
            for run in queue:
                self.results[run.index] = ("not started", "the sweep was stopped")
        finally:
            for s, handler in old.items():
                signal.signal(s, handler)
        return self.results

    def _start(self, run: Run, slot: int):
        log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: starting")
        command = [sys.executable, os.path.join(ROOT, "train.py"), *run.args]
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

    def _log(self, run: Run) -> str:
        return os.path.join(self.log_dir, f"{os.path.basename(run.folder)}.log")

    def _relay(self, run: Run, stream) -> None:
        for line in stream:
            sys.stderr.write(line)
            sys.stderr.flush()
            if line.startswith("error: "):
                self.last_error[run.index] = line[7:].strip()

    def _error_line(self, run: Run) -> str:
        """The run's own `error:` line: from status.json, else its log or stderr."""
        if failure(run):
            return failure(run)
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
            else:
                if run.index in self.relays:
                    self.relays.pop(run.index).join(10)  # it has read the run's last line
                why = self._error_line(run) or (f"killed by {signal.Signals(-code).name}" if code < 0 else "")
                outcome, detail = f"failed (exit {code})", why
            self.results[run.index] = (outcome, detail)
            log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: {outcome}" +
                     (f": {detail}" if detail else ""))


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
    parser.add_argument("sweep", metavar="SWEEP.yaml", help="a W&B sweep file, e.g. configs/sweeps/debug-lr-seed.yaml")
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

    sweep = read_sweep(args.sweep)
    runs = plan(sweep, args.runs_dir, args.seed)
    if args.index is not None:
        if not 0 <= args.index < len(runs):
            raise UserError(f"run index {args.index} is outside this sweep's runs 0..{len(runs) - 1}; check "
                            f"--array (python -m cifar.sweep {sweep.path} --slurm prints it)")
        runs = [runs[args.index]]
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

    states = {run.index: state(run) for run in runs}
    if args.dry_run:
        print(f"sweep {sweep.name}: {len(runs)} run(s), method {sweep.method}, recipe {sweep.recipe or '(defaults)'}")
        _table([(r.index, r.folder, states[r.index], " ".join(r.args)) for r in runs],
               ("#", "folder", "state", "train.py arguments"))
        return
    todo = []
    for run in runs:
        if states[run.index] == "finished":
            why = changed(run, sweep)
            if why:
                warn(f"sweep: run {run.index} finished with another config ({why}); kept as it is: move "
                     f"{run.folder} away to run it again")
            log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: finished before, skipped")
        elif states[run.index] == "running":
            log.info(f"sweep: run {run.index} {os.path.basename(run.folder)}: running elsewhere, skipped")
        else:
            todo.append(run)
    log_dir = os.path.join(args.runs_dir, sweep.name, "logs") if args.parallel > 1 else None
    results = Runner(todo, args.parallel, log_dir).run()
    rows = []
    for run in runs:
        outcome, detail = results.get(run.index, (states[run.index] + " (skipped)", ""))
        rows.append((run.index, os.path.basename(run.folder), outcome, best_acc(run), detail[:100]))
    _table(rows, ("#", "run", "outcome", "best test acc", "detail"))
    print(f"compare them: python -m cifar.compare {os.path.join(args.runs_dir, sweep.name)}")
    if any(o.startswith("failed") for o, _ in results.values()):
        sys.exit(1)
    if any(o in ("stopped", "not started") for o, _ in results.values()):
        sys.exit(EXIT_RESUMABLE)


if __name__ == "__main__":
    main()
