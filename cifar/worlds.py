"""What follows the number of processes: the accumulation that keeps data.global_batch, and the rule by which a
checkpoint saved by one number of processes is loaded by another.

A run is the same training on any number of processes as long as its global batch (data.batch_size x processes x
train.grad_accum_steps) is the same: global batch k is the same images of the (seed, epoch) order, augmented alike,
and every saved quantity but the RNG states is global (the weights, the optimizer and schedule in optimizer steps,
the moving average, the metric sums, the position in the epoch in samples). data.global_batch fixes it, and
train.grad_accum_steps is derived here for the world size the run starts on.
"""
from __future__ import annotations

import copy

from .config import Config
from .errors import UserError

MAX_LISTED = 8          # process counts or batch sizes named in a refusal


def fit(cfg: Config, world: int) -> Config:
    """The config as this world size trains it: with data.global_batch set, a copy whose train.grad_accum_steps is
    global_batch / (batch_size x world). Refused in one line, before anything is read or written, when the global
    batch does not split over `world` processes of data.batch_size, or when a train.grad_accum_steps other than
    1 (its default) contradicts it. Without data.global_batch the config as it is."""
    g, b, given = cfg.data.global_batch, cfg.data.batch_size, cfg.train.grad_accum_steps
    if g is None:
        return cfg
    if g % (b * world):
        raise UserError(f"data.global_batch={g} cannot be kept on {world} process(es) with data.batch_size={b}: "
                        f"{g} is not a multiple of {b} x {world}; {alternatives(g, b, world)}")
    accum = g // (b * world)
    if given not in (1, accum):
        raise UserError(f"train.grad_accum_steps={given} contradicts data.global_batch={g}, which with "
                        f"data.batch_size={b} on {world} process(es) needs {accum}; leave train.grad_accum_steps out "
                        f"(it follows data.global_batch and the number of processes), or set data.global_batch=null")
    fitted = copy.deepcopy(cfg)
    fitted.train.grad_accum_steps = accum
    return fitted


def alternatives(global_batch: int, batch_size: int, world: int) -> str:
    """The sizes that would keep `global_batch`: process counts for this batch_size, batch sizes for this world."""
    counts = process_counts(global_batch, batch_size)
    sizes = [s for s in range(min(batch_size, global_batch // world), 0, -1)
             if global_batch % world == 0 and (global_batch // world) % s == 0][:MAX_LISTED]
    options = []
    if counts:
        options.append(f"on {_listed(counts)} process(es) with data.batch_size={batch_size}")
    if sizes:
        options.append(f"on {world} process(es) with data.batch_size={_listed(sizes)}")
    if not options:
        return (f"no number of processes splits it with data.batch_size={batch_size}, nor does any data.batch_size on "
                f"{world} process(es); choose a data.global_batch that is a multiple of both")
    return "it is kept " + ", or ".join(options)


def process_counts(global_batch: int, batch_size: int) -> list[int]:
    """The numbers of processes of `batch_size` images each that a global batch of `global_batch` splits over."""
    if global_batch % batch_size:
        return []
    per = global_batch // batch_size
    return [w for w in range(1, per + 1) if per % w == 0][:MAX_LISTED]


def _listed(values: list[int]) -> str:
    return ", ".join(map(str, values[:-1])) + f" or {values[-1]}" if len(values) > 1 else str(values[0])


def rng_source(rank: int, saved_world: int) -> int:
    """Which saved rank's RNG states rank `rank` restores. The same world size: its own (bitwise resume). Another:
    rank r takes saved rank r mod saved_world's. Every rank starts a run with the same states (set_seed(seed)) and
    the recipes' networks draw nothing from the global RNG (the data order and each image's crop and flip are
    functions of (seed, epoch, index)), so then the states are equal on every rank and any mapping is exact; a
    network that draws (dropout) continues with a valid state, but its masks are a function of the world size, so
    its training is not the same across world sizes (docs/distributed.md)."""
    return rank % saved_world
