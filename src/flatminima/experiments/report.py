"""Summaries over seeds, the comparison table, and the JSON/CSV files.

The table's columns are :data:`COLUMNS`; :func:`register_column` adds one
(for instance a sharpness measure computed by a metric hook of
:func:`flatminima.experiments.train_run`). A final metric that no column
claims still gets a column, titled by its key, so a hook's numbers always
show up. ``summarize(runs)`` computes every number of the table.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from .train import RunResult


@dataclass(frozen=True)
class Column:
    """A column of the comparison table: ``key`` of the summary, its title,
    the number format, and whether to print ``mean ± std`` or the mean alone."""

    key: str
    title: str
    fmt: str = "{:.1f}"
    spread: bool = True
    help: str = ""


COLUMNS: list[Column] = [
    Column("test_acc", "test acc", "{:.1f}", help="accuracy on the clean test set (%)"),
    Column("test_loss", "test loss", "{:.3f}", help="cross-entropy on the test set"),
    Column("train_clean_acc", "train acc (clean)", "{:.1f}", help="accuracy on the training inputs against their clean labels (%)"),
    Column("memorised", "memorised", "{:.1f}", help="corrupted training examples predicted with their wrong label (%)"),
    Column("gap", "gap", "{:.1f}", help="generalization gap: accuracy on the labels trained on - test accuracy (points)"),
    Column("passes_per_step", "passes", "{:.2f}", spread=False, help="forward/backward passes per optimizer step"),
    Column("steps_per_sec", "steps/s", "{:.0f}", spread=False, help="optimizer steps per second of training"),
    Column("cost", "cost", "{:.2f}x", spread=False, help="time per step relative to the plain base optimizer"),
]

# Summary keys that never get a column of their own.
_HIDDEN = {"epoch", "steps", "lr", "epoch_seconds", "train_seconds", "train_loss", "train_acc", "train_fit_acc",
           "skipped_steps"}


def register_column(column: Column, *, before: str | None = "passes_per_step") -> None:
    """Add (or replace) a table column, by default before the timing columns."""
    for i, c in enumerate(COLUMNS):
        if c.key == column.key:
            COLUMNS[i] = column
            return
    keys = [c.key for c in COLUMNS]
    COLUMNS.insert(keys.index(before) if before in keys else len(COLUMNS), column)


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v)


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaN if empty.
    ``None`` and non-finite values are left out.

    >>> mean_std([1.0, 2.0, 3.0, None])
    (2.0, 1.0)
    >>> mean_std([0.5])
    (0.5, 0.0)
    """
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def summarize(runs: Iterable[RunResult], labels: Sequence[str] | None = None,
              baseline: str | None = None) -> list[dict[str, Any]]:
    """One row per method: ``<key>`` (mean over seeds) and ``<key>_std`` for
    every numeric final metric, ``seeds``, and ``cost`` = baseline's steps
    per second / this method's (None without a baseline)."""
    runs = [r for r in runs if r.completed]
    if labels is None:
        labels = list(dict.fromkeys(r.label for r in runs))
    rows = []
    for label in labels:
        mine = [r for r in runs if r.label == label]
        if not mine:
            continue
        finals = [r.final for r in mine]
        row: dict[str, Any] = {"method": label, "seeds": len(mine), "seed_list": [r.seed for r in mine]}
        keys = list(dict.fromkeys(k for f in finals for k in f))
        for key in keys:
            vals = [_num(f.get(key)) for f in finals]
            if all(v is None for v in vals):
                row[key], row[key + "_std"] = None, None
                continue
            row[key], row[key + "_std"] = mean_std(vals)
        rows.append(row)
    base = next((r for r in rows if r["method"] == baseline), None)
    for row in rows:
        if base is not None and row.get("steps_per_sec") and base.get("steps_per_sec"):
            row["cost"] = base["steps_per_sec"] / row["steps_per_sec"]
        else:
            row["cost"] = None
    return rows


def active_columns(summary: Sequence[Mapping[str, Any]]) -> list[Column]:
    """Registered columns with a value in some row, plus one per unclaimed extra metric."""
    have = {k for row in summary for k, v in row.items() if v is not None}
    cols = [c for c in COLUMNS if c.key in have]
    claimed = {c.key for c in COLUMNS} | _HIDDEN | {"method", "seeds", "seed_list"}
    extras = [k for row in summary for k in row if not k.endswith("_std") and k not in claimed and k in have]
    for key in dict.fromkeys(extras):
        at = next((i for i, c in enumerate(cols) if c.key in ("passes_per_step", "steps_per_sec")), len(cols))
        cols.insert(at, Column(key, key, "{:.4g}"))
    return cols


def _pm() -> str:
    enc = getattr(sys.stdout, "encoding", None) or "utf-8"
    try:
        "±".encode(enc)
        return " ± "
    except (UnicodeEncodeError, LookupError):
        return " +- "


def format_cell(row: Mapping[str, Any], col: Column, pm: str = " ± ") -> str:
    v = row.get(col.key)
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    text = col.fmt.format(v)
    std = row.get(col.key + "_std")
    if col.spread and row.get("seeds", 2) > 1 and std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += pm + col.fmt.format(std).rstrip("x")
    return text


def table(summary: Sequence[Mapping[str, Any]], columns: Sequence[Column] | None = None,
          pm: str | None = None) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)`` of strings."""
    cols = list(columns) if columns is not None else active_columns(summary)
    pm = _pm() if pm is None else pm
    headers = ["method"] + [c.title for c in cols]
    rows = [[str(r["method"])] + [format_cell(r, c, pm) for c in cols] for r in summary]
    return headers, rows


def render_text(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x[i])) for x in [headers, *rows]) for i in range(len(headers))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def render_markdown(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def print_table(summary: Sequence[Mapping[str, Any]], *, title: str | None = None, caption: str | None = None,
                file: TextIO | None = None, rich: bool | None = None) -> None:
    """Print the table: a rich table on a terminal, plain aligned text otherwise."""
    file = file or sys.stdout
    headers, rows = table(summary)
    use_rich = rich if rich is not None else (hasattr(file, "isatty") and file.isatty())
    if use_rich:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            use_rich = False
    if use_rich:
        from rich import box

        console = Console(file=file)
        t = Table(title=title, caption=caption, caption_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for i, h in enumerate(headers):
            t.add_column(h, justify="left" if i == 0 else "right", no_wrap=True)
        for r in rows:
            t.add_row(*r)
        natural = max(len(line) for line in render_text(headers, rows).splitlines()) + 2 * len(headers)
        if natural <= console.width:
            console.print(t)
            return
        # Too wide for the terminal: plain text, which the terminal wraps but never truncates.
    if title:
        print(title, file=file)
    print(render_text(headers, rows), file=file)
    if caption:
        print(caption, file=file)


# --------------------------------------------------------------------------- files
def epochs_csv(runs: Iterable[RunResult]) -> str:
    """Every epoch of every run: ``method, seed, <metrics>``."""
    runs = list(runs)
    keys = list(dict.fromkeys(k for r in runs for row in r.history for k in row))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "seed", *keys])
    for r in runs:
        for row in r.history:
            w.writerow([r.label, r.seed, *(_csv_value(row.get(k)) for k in keys)])
    return buf.getvalue()


def summary_csv(summary: Sequence[Mapping[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for row in summary for k in row if k != "seed_list"))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(keys)
    for row in summary:
        w.writerow([_csv_value(row.get(k)) for k in keys])
    return buf.getvalue()


def _csv_value(v: Any) -> Any:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float):
        return repr(v)  # round-trips exactly
    return v
