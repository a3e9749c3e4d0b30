"""Training-step time of the engine under two sets of overrides, A and B, in fresh processes that alternate.

    python bench/ab_steps.py --a "model.whiten_bias_epochs=null" --b "model.whiten_bias_epochs=1" [--repeats 3]
                             [--config configs/fast94.yaml] [key=value ...]

Each run is a real `train.py` of 2 short epochs; the time per step is taken from the last epoch's row (the first
one carries the warm-up), so an override that only acts from epoch 1 on (such as a parameter frozen after epoch 0)
shows fully. Reports every run and the best and median of each side.
"""
import shlex
import statistics

from common import SHORT_RUN, parser, train


def ms_per_step(config: str, overrides: list[str]) -> float:
    _, rows = train(["--config", config, *SHORT_RUN, *overrides])
    epochs = [r for r in rows if "epoch_time" in r]
    steps = epochs[-1]["step"] - epochs[-2]["step"]
    return 1e3 * epochs[-1]["epoch_time"] / steps


def main():
    ap = parser(__doc__)
    ap.add_argument("--a", required=True, help="overrides of side A, space-separated")
    ap.add_argument("--b", required=True, help="overrides of side B, space-separated")
    ap.add_argument("--repeats", type=int, default=3)
    args, common = ap.parse_known_args()
    sides = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    times = {"A": [], "B": []}
    for _ in range(args.repeats):
        for side, overrides in sides.items():
            times[side].append(ms_per_step(args.config, [*common, *overrides]))
            print(f"{side} ({' '.join(overrides)}): {times[side][-1]:8.1f} ms/step", flush=True)
    for how, pick in (("best", min), ("median", statistics.median)):
        a, b = pick(times["A"]), pick(times["B"])
        print(f"{how} of {args.repeats}: A {a:.1f} ms/step, B {b:.1f} ms/step ({100 * (b / a - 1):+.1f}%)")


if __name__ == "__main__":
    main()
