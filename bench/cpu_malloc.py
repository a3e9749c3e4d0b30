"""CPU training with and without train.keep_freed_memory: ms per step and page faults per step of the engine.

    python bench/cpu_malloc.py [--repeats 3] [--config configs/fast94.yaml] [key=value ...]

Each run is a fresh `train.py` process (malloc settings are per process), alternating on/off, best of N. Page
faults are the child's minor faults over the whole run (data loading included) divided by its steps.
"""
import resource

from common import SHORT_RUN, parser, train


def one_run(config: str, overrides: list[str], keep: bool) -> tuple[float, float]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt
    s, _ = train(["--config", config, *SHORT_RUN, *overrides, f"train.keep_freed_memory={str(keep).lower()}"])
    faults = resource.getrusage(resource.RUSAGE_CHILDREN).ru_minflt - before
    return 1e3 * s["train_seconds"] / s["steps"], faults / s["steps"]


def main():
    ap = parser(__doc__)
    ap.add_argument("--repeats", type=int, default=3)
    args, overrides = ap.parse_known_args()
    results = {True: [], False: []}
    for _ in range(args.repeats):
        for keep in (False, True):
            results[keep].append(one_run(args.config, overrides, keep))
            ms, faults = results[keep][-1]
            print(f"keep_freed_memory={keep!s:5}: {ms:8.1f} ms/step, {faults:9.0f} page faults/step", flush=True)
    best = {k: min(ms for ms, _ in v) for k, v in results.items()}
    print(f"best of {args.repeats}: off {best[False]:.1f} ms/step, on {best[True]:.1f} ms/step "
          f"({100 * (best[True] / best[False] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
