"""PNG plots of a comparison (matplotlib, drawn on an Agg canvas of their own).

* ``curves.png``: test accuracy, accuracy on the clean training labels, test
  loss and training loss per epoch, one line per method: the mean over seeds
  with a band of ± one standard deviation.
* ``final_accuracy.png``: final test accuracy (and clean-train accuracy) per
  method, bars from 0 with the mean, ± std error bars and every seed as a dot.

No ``pyplot`` and no backend switch: a user's matplotlib state (its backend
included) is left as it was; only the ``flatminima`` command's own process
picks Agg (:func:`flatminima.experiments.cli.main`). Each method gets its
own colour and line style and markers, so 13 methods stay apart and a
one-epoch run still shows its points.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from flatminima.sharpness.plot import figure, line_styles, save

from .train import RunResult

CURVES = (
    ("test_acc", "test accuracy (%)"),
    ("train_clean_acc", "train accuracy, clean labels (%)"),
    ("test_loss", "test loss"),
    ("train_loss", "train loss (labels trained on)"),
)
DPI = 110


def _series(runs: Sequence[RunResult], key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """epochs, mean, std over the runs (epochs that every run reached)."""
    n = min(len(r.history) for r in runs)
    vals = np.array([[np.nan if row.get(key) is None else row[key] for row in r.history[:n]] for r in runs], dtype=float)
    epochs = np.array([row["epoch"] for row in runs[0].history[:n]])
    std = vals.std(axis=0, ddof=1) if len(runs) > 1 else np.zeros(n)
    return epochs, vals.mean(axis=0), std


def _title(fig: Any, title: str, width_in: float) -> None:
    """The figure's title, wrapped to the figure's width (constrained layout keeps it inside)."""
    if title:
        fig.suptitle(textwrap.fill(title, max(30, int(width_in * 13))), fontsize=10)


def plot_curves(runs: Sequence[RunResult], labels: Sequence[str], path: str | os.PathLike[str], title: str = "") -> Path:
    from matplotlib.ticker import MaxNLocator

    size = (12.0 if len(labels) > 6 else 11.0, 7.5)
    fig = figure(size)
    axes = fig.subplots(2, 2, sharex=True)
    last = 1
    for label, style in zip(labels, line_styles(len(labels))):
        mine = [r for r in runs if r.label == label and r.history]
        if not mine:
            continue
        for ax, (key, _) in zip(axes.flat, CURVES):
            x, m, s = _series(mine, key)
            last = max(last, int(x[-1]) if len(x) else 1)
            ax.plot(x, m, label=f"{label} (n={len(mine)})", lw=1.6, markersize=4,
                    markevery=max(1, len(x) // 12), **style)  # markers: a 1-epoch run is a visible point
            ax.fill_between(x, m - s, m + s, color=style["color"], alpha=0.15, lw=0)
    for ax, (_, name) in zip(axes.flat, CURVES):
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.tick_params(labelbottom=True)  # sharex hides the top row's tick labels otherwise
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if last <= 3:  # a point or three: whole epochs on the axis, not 0.95 ... 1.05
            ax.set_xlim(0.5, last + 0.5)
            ax.set_xticks(range(1, last + 1))
    if axes[0, 0].lines:
        fig.legend(handles=axes[0, 0].lines, loc="outside right upper", fontsize=8, title="method (seeds)",
                   title_fontsize=8)
    _title(fig, title, size[0])
    return save(fig, Path(path), DPI)


def plot_final(runs: Sequence[RunResult], labels: Sequence[str], path: str | os.PathLike[str], title: str = "") -> Path:
    keys = (("test_acc", "test", "#1f77b4"), ("train_clean_acc", "train (clean labels)", "#ff7f0e"))
    size = (max(6.0, 0.9 * len(labels) + 3.0), 5.0)
    fig = figure(size)
    ax = fig.add_subplot()
    width = 0.38
    x = np.arange(len(labels))
    jitter = np.random.default_rng(0)  # fixed: the same picture for the same runs
    for j, (key, name, colour) in enumerate(keys):
        means, stds = [], []
        at = x + (j - 0.5) * width
        for i, label in enumerate(labels):
            vals = [r.final[key] for r in runs if r.label == label and r.completed and r.final.get(key) is not None]
            means.append(np.mean(vals) if vals else np.nan)
            stds.append(np.std(vals, ddof=1) if len(vals) > 1 else 0.0)
            # the seeds above the error bars, spread sideways within the bar: each one seen
            spread = jitter.uniform(-0.25, 0.25, len(vals)) * width
            ax.scatter(at[i] + spread, vals, s=22, color="black", edgecolors="white", linewidths=0.7, zorder=4,
                       label="one seed" if j == 0 and i == 0 and vals else None)
        ax.bar(at, means, width, yerr=stds, color=colour, alpha=0.85, label=f"{name}: mean ± std",
               error_kw={"capsize": 4, "elinewidth": 1.2, "ecolor": "0.25", "zorder": 3})
    long = max(map(len, labels), default=0) > 8
    ax.set_xticks(x, labels, rotation=25 if long else 0, ha="right" if long else "center")
    ax.set_xlabel("method")
    ax.set_ylabel("final accuracy (%)")
    ax.set_ylim(0.0, 100.0)  # from 0: bar heights compare as the accuracies do
    ax.grid(axis="y", alpha=0.3)
    # below the axes: inside, it would cover bars that start at 0
    fig.legend(*ax.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=8)
    _title(fig, title, size[0])
    return save(fig, Path(path), DPI)


def plot_all(runs: Sequence[RunResult], labels: Sequence[str], folder: str | os.PathLike[str], title: str = "") -> list[Path]:
    folder = Path(folder)
    return [plot_curves(runs, labels, folder / "curves.png", title), plot_final(runs, labels, folder / "final_accuracy.png", title)]
