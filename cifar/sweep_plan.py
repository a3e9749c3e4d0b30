"""A W&B sweep file read, checked and expanded into the list of train.py runs it makes (cifar.sweep runs them).

read_sweep refuses what W&B would refuse and what this project cannot run, with one line; plan gives the runs, each
built (folder, arguments, its config checked) only when asked for, and checks the first CHECKED_AHEAD before any
starts. Grid order: the first parameter slowest, as written; random search: run_cap draws from random.Random(seed).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import yaml

from . import yaml_io
from .config import config_loader, parse_overrides
from .errors import UserError, shorten

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
# A float overflows above e**709.78: log_uniform's max and log_normal's mu + 10 sigma are exponents.
MAX_EXPONENT = math.log(sys.float_info.max)


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
class PlannedRun:
    index: int
    params: dict[str, Any]                   # dotted config key -> value
    folder: str
    args: list[str] = field(default_factory=list)   # train.py's command line after `train.py`
    problem: str | None = None               # why its config does not check (one line), if it does not


# ----------------------------------------------------------------------------- the file

def read_sweep(path: str) -> Sweep:
    """A sweep file -> Sweep, refusing what W&B would refuse and what this runner cannot run."""
    try:
        with open(path) as f:
            raw = yaml_io.safe_load(f, f"sweep file {path}")
    except FileNotFoundError:
        raise UserError(f"sweep file {path} not found; pass a sweep file, or a shipped sweep's name such as "
                        f"debug-lr-seed")
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
                        f"goes in command: [..., --config, debug, ${{args_no_hyphens}}])")
    method = raw.get("method")
    if method not in ("grid", "random", "bayes", "custom"):
        raise UserError(f"{where}: method must be grid, random or bayes (W&B requires it); got {shorten(method)}")
    if method in ("bayes", "custom"):
        raise UserError(f"{where}: method {method} is run by W&B's server: start it with `wandb sweep {path}` and "
                        f"`wandb agent`; here use method: grid or random")
    program = raw.get("program", "train.py")
    if not isinstance(program, str) or os.path.basename(program) != "train.py":
        raise UserError(f"{where}: program must be train.py; got {shorten(program)}")
    name = raw.get("name", os.path.splitext(os.path.basename(path))[0])
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._+-]+", name) or name.startswith("."):
        raise UserError(f"{where}: name {shorten(name)} becomes a folder name: use letters, digits and . _ + - only")
    run_cap = raw.get("run_cap")
    if run_cap is not None and (isinstance(run_cap, bool) or not isinstance(run_cap, int) or run_cap < 1):
        raise UserError(f"{where}: run_cap must be a positive integer (W&B requires it); got {shorten(run_cap)}")
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
            raise UserError(f"{where}: {key} must be a string; got {shorten(raw[key])}")
    return Sweep(path, name, method, recipe, fixed, specs, run_cap, raw.get("project"), raw.get("entity"))


def _read_command(command, where: str) -> tuple[str | None, list[str]]:
    """The recipe (--config X) and fixed overrides of a W&B `command`; refuses one whose parameters never reach
    train.py. No command: W&B's default (${env} ${interpreter} ${program} ${args}), the default recipe."""
    if command is None:
        return None, []
    if not isinstance(command, list) or not all(isinstance(c, (str, int, float)) for c in command):
        raise UserError(f"{where}: command must be a list, e.g. [${{env}}, ${{interpreter}}, ${{program}}, --config, "
                        f"debug, ${{args_no_hyphens}}]")
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
                            f"{{value: ...}}; got {shorten(spec)}")
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
        raise UserError(f"{where}: parameter {key} has {shorten(sorted(unknown, key=str)[0])}, which W&B does not "
                        f"know; use value, values, or distribution with min/max (or mu/sigma)")
    dist = _distribution(spec)
    if not isinstance(dist, str) or dist not in DISTRIBUTIONS:
        raise UserError(f"{where}: parameter {key}: distribution {shorten(dist)} is not one of "
                        f"{', '.join(DISTRIBUTIONS)}")
    missing = [k for k in DISTRIBUTIONS[dist] if k not in spec]
    if missing:
        raise UserError(f"{where}: parameter {key}: distribution {dist} needs {' and '.join(missing)}")
    if "values" in spec and (not isinstance(spec["values"], list) or not spec["values"]):
        raise UserError(f"{where}: parameter {key}: values must be a non-empty list; an empty grid makes no runs")
    if method == "grid" and dist not in ("constant", "categorical"):
        raise UserError(f"{where}: parameter {key} has distribution {dist}: a grid needs values (or value) for every "
                        f"parameter; use method: random to draw from a distribution")
    _check_numbers(key, spec, where)
    if ("min" in spec or "max" in spec) and not spec.get("min", math.inf) < spec.get("max", -math.inf):
        raise UserError(f"{where}: parameter {key}: min and max must be numbers with min < max; got "
                        f"{shorten(spec.get('min'))}, {shorten(spec.get('max'))}")
    if dist == "int_uniform" and not all(isinstance(spec[k], int) for k in ("min", "max")):
        raise UserError(f"{where}: parameter {key}: int_uniform needs integer min and max")
    if dist in ("log_uniform_values", "q_log_uniform_values") and spec["min"] <= 0:
        raise UserError(f"{where}: parameter {key}: {dist} needs min > 0")
    if "probabilities" in spec:
        p = spec["probabilities"]
        if not isinstance(p, list) or len(p) != len(spec.get("values", [])) or \
                not all(_is_number(x) and x >= 0 for x in p) or not math.isclose(sum(p), 1.0):
            raise UserError(f"{where}: parameter {key}: probabilities must be numbers >= 0, one per value, summing "
                            f"to 1")


def _check_numbers(key: str, spec: dict, where: str) -> None:
    """min, max, mu, sigma and q are finite numbers; q (the step draws are rounded to) > 0, sigma >= 0; draws that
    are exponents cannot overflow a float. One line each, before anything is drawn."""
    for name in ("min", "max", "mu", "sigma", "q"):
        if name in spec and not (_is_number(spec[name]) and math.isfinite(spec[name])):
            raise UserError(f"{where}: parameter {key}: {name} must be a finite number; got {shorten(spec[name])}")
    if spec.get("q", 1) <= 0:
        raise UserError(f"{where}: parameter {key}: q, the step its draws are rounded to, must be > 0; got "
                        f"{shorten(spec['q'])}")
    if spec.get("sigma", 0) < 0:
        raise UserError(f"{where}: parameter {key}: sigma must be >= 0; got {shorten(spec['sigma'])}")
    dist = _distribution(spec)
    top = spec.get("max", 0) if dist == "log_uniform" else \
        spec.get("mu", 0) + 10 * spec.get("sigma", 0) if dist == "log_normal" else 0
    if top > MAX_EXPONENT:
        raise UserError(f"{where}: parameter {key}: {dist} draws e to the power of up to {top:g} (its "
                        f"{'max' if dist == 'log_uniform' else 'mu + 10 sigma'}), which overflows a float above "
                        f"{MAX_EXPONENT:.2f}: its numbers are natural logs (log_uniform_values takes the values)")


def _is_number(x) -> bool:
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
# Lazy throughout: a grid of 10^8 points with run_cap 3 is three points, its size is arithmetic, and run i is built
# without the ones before it.

CHECKED_AHEAD = 100   # runs whose configs plan() checks before any starts; the later ones as each is built


def count(sweep: Sweep) -> int:
    """How many runs the sweep makes: the grid's size (the product of its lists' lengths) or run_cap if smaller;
    random search: run_cap."""
    if sweep.method != "grid":
        return sweep.run_cap
    size = math.prod(len(choices) for choices in _choices(sweep))
    return min(size, sweep.run_cap) if sweep.run_cap else size


def _choices(sweep: Sweep) -> list[list]:
    """Each grid parameter's values, in the file's order."""
    return [spec["values"] if "values" in spec else [spec["value"]] for spec in sweep.parameters.values()]


def expand(sweep: Sweep, seed: int = 0) -> Iterator[dict[str, Any]]:
    """The points of the sweep, in order, one at a time: the grid's product (first parameter slowest, as written),
    or run_cap draws from random.Random(seed). The first N points stay the same when run_cap grows."""
    keys = list(sweep.parameters)
    if sweep.method == "grid":
        return (dict(zip(keys, combo)) for combo in itertools.islice(itertools.product(*_choices(sweep)), count(sweep)))
    rng = random.Random(seed)
    return ({k: _draw(sweep.parameters[k], rng) for k in keys} for _ in range(sweep.run_cap))


def point(sweep: Sweep, index: int, seed: int = 0) -> dict[str, Any]:
    """Point `index` of expand(sweep, seed). A grid's is read off its index (mixed radix, the last parameter
    fastest) without the points before it; random search draws the ones before it (the same generator)."""
    if sweep.method != "grid":
        return next(itertools.islice(expand(sweep, seed), index, None))
    picked = {}
    for key, choices in reversed(list(zip(sweep.parameters, _choices(sweep)))):
        index, i = divmod(index, len(choices))
        picked[key] = choices[i]
    return {key: picked[key] for key in sweep.parameters}


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


def varying(sweep: Sweep, seed: int = 0) -> list[str]:
    """The parameters whose value changes from run to run: they name the run folders and tag the W&B runs. Found
    without listing the runs: in a grid's first n points, a parameter whose later ones make `stride` combinations
    takes its first ceil(n / stride) values; random search: one pass over the draws, which stops once every
    parameter that can change has."""
    if sweep.method == "grid":
        n, stride, seen = count(sweep), 1, {}
        for key, choices in reversed(list(zip(sweep.parameters, _choices(sweep)))):
            seen[key] = choices[:-(-n // stride)]   # ceil(n / stride), in integers: a grid's size can be huge
            stride *= len(choices)
        return [key for key in sweep.parameters if len(set(map(_same, seen[key]))) > 1]
    specs = sweep.parameters
    can = {k for k in specs if _distribution(specs[k]) not in ("constant", "categorical")
           or len(set(map(_same, specs[k].get("values", [])))) > 1}
    points = expand(sweep, seed)
    first, changed = next(points), set()
    for p in itertools.takewhile(lambda _: changed != can, points):
        changed |= {k for k in can - changed if _same(p[k]) != _same(first[k])}
    return [key for key in specs if key in changed]


def _same(value) -> str:
    """A value's identity across runs: 1 and 1.0 differ, key order in a mapping does not."""
    return json.dumps(value, sort_keys=True)


def tag_value(value) -> str:
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


class Plan:
    """The sweep's runs, built one at a time when asked for: len() by arithmetic, plan[i] (run i alone) and
    iteration in order. A run whose config does not check carries the one-line reason in `problem`."""

    def __init__(self, sweep: Sweep, runs_dir: str, seed: int = 0):
        self.sweep, self.runs_dir, self.seed = sweep, runs_dir, seed
        self.size = count(sweep)
        self.names = varying(sweep, seed)
        self.width = max(2, len(str(self.size - 1)))
        self.load = config_loader(sweep.recipe)   # the recipe is read once, not once per run
        self.tags = list(self.load(sweep.fixed).wandb.tags)
        self.fixed_keys = {k for k, _ in parse_overrides(sweep.fixed)}

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> PlannedRun:
        if not 0 <= index < self.size:
            raise IndexError(index)
        return self._run(index, point(self.sweep, index, self.seed))

    def __iter__(self) -> Iterator[PlannedRun]:
        return (self._run(i, p) for i, p in enumerate(expand(self.sweep, self.seed)))

    def _run(self, i: int, point: dict) -> PlannedRun:
        """Run i with its folder and train.py arguments, its config built and checked."""
        sweep = self.sweep
        label = ",".join(f"{k}={tag_value(point[k])}" for k in self.names) or "run"
        label = re.sub(r"[^A-Za-z0-9._=,+-]", "_", label)[:120]
        folder = os.path.join(self.runs_dir, sweep.name, f"{i:0{self.width}d}-{label}")
        args = (["--config", sweep.recipe] if sweep.recipe else []) + list(sweep.fixed)
        args += [arg(k, v) for k, v in point.items()]
        if "wandb.group" not in self.fixed_keys | set(point):
            args.append(arg("wandb.group", sweep.name))
        for key, value in (("wandb.project", sweep.project), ("wandb.entity", sweep.entity)):
            if value and key not in self.fixed_keys | set(point):
                args.append(arg(key, value))
        args.append(arg("wandb.tags", self.tags + [f"{k}={tag_value(point[k])}" for k in self.names]))
        args.append(arg("output_dir", folder))
        try:
            self.load(args[2 if sweep.recipe else 0:])
            problem = None
        except UserError as e:
            problem = f"sweep {sweep.path}, run {i} ({label}): {e}"
        return PlannedRun(i, point, folder, args, problem)


def plan(sweep: Sweep, runs_dir: str, seed: int = 0) -> Plan:
    """The sweep's runs; the configs of the first CHECKED_AHEAD (every run of most sweeps) are checked now, so that
    a bad one is refused before anything starts."""
    runs = Plan(sweep, runs_dir, seed)
    if not len(runs):
        raise UserError(f"sweep {sweep.path} makes no runs; give every parameter at least one value")
    for run in itertools.islice(runs, CHECKED_AHEAD):
        if run.problem:
            raise UserError(run.problem)
    return runs
