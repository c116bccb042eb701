"""The study's plots: one panel per set-up (rows) and noise level (columns).

* ``accuracy_vs_passes.png``: test accuracy (mean, 95% CI bars) against the
  forward-backward passes of the whole run, one marker per method: what
  each method buys per unit of compute (the markers are spread by 1.5% of
  x per method, so that methods with the same passes stay visible).
* ``difference_to_sgd.png``: the paired difference to SGD with its 95% CI,
  one line per method, 0 marked.
* ``sharpness.png``: test accuracy against ``lambda_max`` at the end of
  training (log scale where the values span a factor of 10): does the
  flatter solution generalize better?

Drawn with matplotlib's object API (``matplotlib.figure.Figure``), which
needs no backend and leaves the caller's pyplot state alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .study_report import BASELINE, StudyRow, rows_by_cell

if TYPE_CHECKING:
    from .study import Preset

# Ten distinct colour/marker pairs (tab10 colours), one per method of the study.
STYLES = [("#1f77b4", "o"), ("#ff7f0e", "s"), ("#2ca02c", "^"), ("#d62728", "D"), ("#9467bd", "v"),
          ("#8c564b", "P"), ("#e377c2", "X"), ("#7f7f7f", "<"), ("#bcbd22", ">"), ("#17becf", "*")]


def _style(i: int) -> tuple[str, str]:
    return STYLES[i % len(STYLES)]


def _grid(preset: Preset, title: str) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    nr, nc = len(preset.setups), len(preset.noises)
    fig = Figure(figsize=(3.4 * nc + 1.0, 2.9 * nr + 1.6))
    axes = fig.subplots(nr, nc, squeeze=False)
    fig.suptitle(title, fontsize=11)
    for i, s in enumerate(preset.setups):
        for j, n in enumerate(preset.noises):
            axes[i][j].set_title(f"{s.name}, {n.name}", fontsize=9)
            axes[i][j].grid(alpha=0.3)
            axes[i][j].tick_params(labelsize=7)
    return fig, axes


def _finish(fig: Any, axes: Any, preset: Preset, path: Path, handles: dict[str, Any]) -> Path:
    fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 5), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0.09 if len(handles) > 5 else 0.06, 1, 0.97))
    fig.savefig(path, dpi=100)
    return path


def plot_accuracy_vs_passes(rows: Sequence[StudyRow], preset: Preset, path: Path) -> Path:
    fig, axes = _grid(preset, "test accuracy against forward-backward passes of the run (mean, 95% CI over seeds)")
    by = rows_by_cell(rows)
    handles: dict[str, Any] = {}
    for i, s in enumerate(preset.setups):
        for j, n in enumerate(preset.noises):
            ax = axes[i][j]
            for r in by.get((s.name, n.name), []):
                k = preset.methods.index(r.method)
                color, marker = _style(k)
                err = r.test_acc.half if math.isfinite(r.test_acc.half) else 0.0
                # spread by 1.5% per method: SAM, ASAM, WSAM and GSAM share their passes and would hide each other
                dodge = 1.0 + 0.015 * (k - (len(preset.methods) - 1) / 2)
                h = ax.errorbar(r.total_passes / 1000.0 * dodge, r.test_acc.mean, yerr=err, fmt=marker,
                                color=color, ms=6, capsize=3, lw=1)
                handles.setdefault(r.method, h)
            if i == len(preset.setups) - 1:
                ax.set_xlabel("total passes (thousands)", fontsize=8)
            if j == 0:
                ax.set_ylabel("test accuracy (%)", fontsize=8)
    return _finish(fig, axes, preset, path, handles)


def plot_difference(rows: Sequence[StudyRow], preset: Preset, path: Path) -> Path:
    fig, axes = _grid(preset, "paired difference to SGD in test accuracy (mean, 95% CI over seeds)")
    by = rows_by_cell(rows)
    methods = [m for m in preset.methods if m != BASELINE]
    handles: dict[str, Any] = {}
    for i, s in enumerate(preset.setups):
        for j, n in enumerate(preset.noises):
            ax = axes[i][j]
            ax.axvline(0.0, color="k", lw=0.8)
            for r in by.get((s.name, n.name), []):
                if r.diff is None:
                    continue
                k = methods.index(r.method)
                color, marker = _style(preset.methods.index(r.method))
                err = r.diff.half if math.isfinite(r.diff.half) else 0.0
                h = ax.errorbar(r.diff.mean, k, xerr=err, fmt=marker, color=color, ms=5, capsize=3, lw=1)
                handles.setdefault(r.method, h)
            ax.set_yticks(range(len(methods)), methods if j == 0 else [""] * len(methods), fontsize=7)
            ax.invert_yaxis()
            if i == len(preset.setups) - 1:
                ax.set_xlabel("test accuracy − SGD (points)", fontsize=8)
    return _finish(fig, axes, preset, path, handles)


def plot_sharpness(rows: Sequence[StudyRow], preset: Preset, path: Path) -> Path | None:
    if not any(r.lambda_max is not None for r in rows):
        return None
    fig, axes = _grid(preset, "test accuracy against λ_max of the training loss at the end (means over seeds)")
    by = rows_by_cell(rows)
    handles: dict[str, Any] = {}
    for i, s in enumerate(preset.setups):
        for j, n in enumerate(preset.noises):
            ax = axes[i][j]
            mine = [r for r in by.get((s.name, n.name), []) if r.lambda_max is not None]
            for r in mine:
                color, marker = _style(preset.methods.index(r.method))
                h = ax.plot([r.lambda_max], [r.test_acc.mean], marker=marker, color=color, ms=6, ls="none")[0]
                handles.setdefault(r.method, h)
            # log scale only where it helps and is defined: positive values spanning a factor of 10 or more
            # (power iteration returns the eigenvalue of largest magnitude, negative for an untrained model)
            values = [r.lambda_max for r in mine if r.lambda_max is not None]
            log = bool(values) and min(values) > 0 and max(values) / min(values) >= 10
            if log:
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.xaxis.set_minor_formatter(NullFormatter())
            if i == len(preset.setups) - 1 or log:
                ax.set_xlabel("λ_max" + (" (log scale)" if log else ""), fontsize=8)
            if j == 0:
                ax.set_ylabel("test accuracy (%)", fontsize=8)
    return _finish(fig, axes, preset, path, handles)


def plot_study(rows: Sequence[StudyRow], preset: Preset, out: Path) -> list[Path]:
    written = [plot_accuracy_vs_passes(rows, preset, out / "accuracy_vs_passes.png"),
               plot_difference(rows, preset, out / "difference_to_sgd.png")]
    sharp = plot_sharpness(rows, preset, out / "sharpness.png")
    return written + ([sharp] if sharp is not None else [])
