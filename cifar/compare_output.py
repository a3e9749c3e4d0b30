"""python -m cifar.compare's rows written out: a rich table for a person, GitHub markdown for a report, CSV and JSON
for a spreadsheet or a notebook. One record per row (a run, or a seed group), four renderings of it."""
from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import Counter

from .console import cell
from .run_folder import STATES


class _Missing:
    """A key that a run's config does not have (the run predates it): shown as "-", equal to no value."""

    def __repr__(self):
        return "-"


MISSING = _Missing()


def show(value) -> str:
    """A setting as YAML writes it (0.01, true, null, [a, b]); "-" for a key the run's config lacks."""
    if value is MISSING:
        return "-"
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value).replace('"', "")
    return str(value)


def state_counts(runs) -> str:
    """'2 finished, 1 failed', in the order of STATES."""
    counts = Counter(run.state for run in runs)
    order = sorted(counts, key=lambda s: (STATES.index(s) if s in STATES else len(STATES), s))
    return ", ".join(f"{counts[s]} {s}" for s in order)


def mean_and_stdev(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (ddof=1; none for a single value)."""
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def record(row, view) -> tuple[dict, dict]:
    """A row as values (JSON, CSV: numbers unformatted) and as text (table, markdown), in column order."""
    metric = view.metric
    form = "{:.2f}" if "acc" in metric else "{:.4g}"
    raw = {"group" if view.by_seed else "run": row.label, **{k: row.value(k, metric) for k in view.differing}}
    text = {k: show(v) for k, v in raw.items()}
    outcomes = [run.outcome(metric) for run in row.runs]
    if not view.by_seed:
        (o,), run = outcomes, row.runs[0]
        raw.update(best=o["best"], final=o["final"], **{other: run.outcome(other)["final"] for other in view.also})
        raw.update(steps=o["steps"], time=o["time"], images_per_sec=o["images_per_sec"], status=run.status_text())
        text.update({f"best {metric}": cell(o["best"], form), f"final {metric}": cell(o["final"], form),
                     **{f"final {other}": cell(raw[other], "{:.2f}") for other in view.also}})
        text.update({"steps": cell(o["steps"]), "time": cell(o["time"], "{:.1f}s"),
                     "img/s": cell(o["images_per_sec"], "{:.0f}"), "status": run.status_text()})
        return raw, text
    raw.update(n=len(row.runs), seeds=row.seeds())
    text.update(n=str(len(row.runs)), seeds=" ".join(show(s) for s in row.seeds()))
    also = [(other, f"final {other}", "{:.2f}", "") for other in view.also]
    for key, header, fmt, unit in (("best", f"best {metric}", form, ""), ("final", f"final {metric}", form, ""),
                                   *also, ("time", "time", "{:.1f}", "s")):
        values = [run.outcome(key)["final"] if key in view.also else o[key] for o, run in zip(outcomes, row.runs)]
        mean, std = mean_and_stdev([v for v in values if v is not None])  # the runs that have a value
        raw[key], raw[f"{key}_std"] = mean, std
        text[header] = "-" if mean is None else fmt.format(mean) + (f" ± {fmt.format(std)}" if std is not None
                                                                    else "") + unit
    raw["status"] = text["status"] = row.runs[0].status_text() if len(row.runs) == 1 else state_counts(row.runs)
    raw["runs"] = [run.name for run in row.runs]
    return raw, text


def _numeric(header: str, view, raws: list[dict]) -> bool:
    """Right-aligned: the outcomes, and a setting whose values are all numbers."""
    if header in ("n", "steps", "time", "img/s") or header.startswith(("best ", "final ")):
        return True
    return header in view.differing and all(isinstance(r[header], (int, float)) and not isinstance(r[header], bool)
                                            for r in raws)


def print_table(view, raws: list[dict], texts: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    runs = sum(len(row.runs) for row in view.rows)
    title = f"{runs} run{'s' * (runs > 1)}" + (f" in {len(view.rows)} seed groups" if view.by_seed else "")
    table = Table(title=title, title_justify="left")
    first, last = list(texts[0])[0], "status"
    for header in texts[0]:  # a narrow terminal wraps the names and statuses; settings and numbers stay whole
        whole = max(len(header), *(len(t[header]) for t in texts)) if header not in (first, last) else None
        table.add_column(header, no_wrap=whole is not None, min_width=whole, overflow="fold",
                         justify="right" if _numeric(header, view, raws) else "left")
    for row, text in zip(view.rows, texts):
        status = text["status"]
        table.add_row(Text(text[next(iter(text))], style=row.color), *map(Text, list(text.values())[1:-1]),
                      Text(status, style="" if status.endswith("finished") else
                           "red" if "failed" in status else "yellow"))
    # a log or a pipe: as wide as the table, never cut; a terminal: its width
    width = None if sys.stdout.isatty() else max(120, Console(width=100_000).measure(table).maximum)
    console = Console(width=width)
    if view.shared:
        console.print(Text("shared: " + "  ".join(f"{k}={show(v)}" for k, v in view.shared.items()), style="dim"))
    console.print(table)


def markdown(view, raws: list[dict], texts: list[dict]) -> str:
    def line(cells):
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    lines = [f"shared: {', '.join(f'`{k}={show(v)}`' for k, v in view.shared.items())}", ""] if view.shared else []
    lines += [line(texts[0]), "|" + "|".join("---:" if _numeric(h, view, raws) else "---"
                                            for h in texts[0]) + "|"]
    return "\n".join(lines + [line(text.values()) for text in texts]) + "\n"


def _csv_cell(value):
    if isinstance(value, list):
        return " ".join(show(v) for v in value)
    return "" if value is None else show(value) if value is MISSING or isinstance(value, (bool, dict)) else value


def print_view(view, fmt: str) -> None:
    raws, texts = map(list, zip(*(record(row, view) for row in view.rows)))
    if fmt == "table":
        print_table(view, raws, texts)
    elif fmt == "md":
        sys.stdout.write(markdown(view, raws, texts))
    elif fmt == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(raws[0])
        writer.writerows([_csv_cell(v) for v in raw.values()] for raw in raws)
    else:  # a key a run lacks is null, as an unset one
        print(json.dumps({"metric": view.metric, "mode": "by-seed" if view.by_seed else "each-run",
                          "shared": view.shared, "rows": raws}, indent=1, default=lambda v: None))
