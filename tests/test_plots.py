"""The pictures (issue #16 item 5), checked by their structure, not their
pixels: bars from 0, seed dots drawn over the error bars, a distinct colour
and line-style pair per method, markers (a one-epoch run shows points),
titles inside the picture, labels on every axis, the landscape's split and
sample count, and no matplotlib backend forced on a Python caller."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")

import flatminima  # noqa: E402
from flatminima.experiments import plots  # noqa: E402
from flatminima.experiments.train import RunResult  # noqa: E402
from flatminima.sharpness import plot as sharpness_plot  # noqa: E402

METHODS = ["sgd", *flatminima.list_methods()]  # 14 rows, as `--methods all` gives with a plain baseline


def fake_runs(labels: list[str], seeds: int = 3, epochs: int = 1, base: float = 60.0) -> list[RunResult]:
    """Completed runs whose accuracies lie between ``base`` and ``base + 20``."""
    runs = []
    for i, label in enumerate(labels):
        for s in range(seeds):
            acc = base + i + 0.5 * s
            history = [{"epoch": e + 1, "test_acc": acc - (epochs - 1 - e), "train_clean_acc": acc + 5,
                        "test_loss": 1.0 + 0.01 * i, "train_loss": 0.9 + 0.01 * s, "steps": 10 * (e + 1),
                        "epoch_seconds": 0.1} for e in range(epochs)]
            runs.append(RunResult(label, label, s, epochs, history, completed=True))
    return runs


@pytest.fixture
def drawn(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The figures the plot functions save (the real ``save`` still writes them)."""
    figures: list[Any] = []
    real = sharpness_plot.save

    def spy(fig: Any, path: Any, dpi: int) -> Path:
        figures.append(fig)
        return real(fig, path, dpi)

    monkeypatch.setattr(plots, "save", spy)
    monkeypatch.setattr(sharpness_plot, "save", spy)
    return figures


def inside(fig: Any, artist: Any) -> bool:
    box, page = artist.get_window_extent(fig.canvas.get_renderer()), fig.bbox
    return page.x0 <= box.x0 and box.x1 <= page.x1 and page.y0 <= box.y0 and box.y1 <= page.y1


def test_final_accuracy_bars_start_at_zero_with_every_seed_drawn_over_the_error_bars(tmp_path: Path,
                                                                                    drawn: list[Any]) -> None:
    labels = ["sgd", "sam:rho=0.05", "asam"]
    runs = fake_runs(labels, base=60.0)  # all accuracies >= 60: the old axis began at 50
    plots.plot_final(runs, labels, tmp_path / "final.png", "a title")
    (fig,) = drawn
    (ax,) = fig.axes
    assert ax.get_ylim() == (0.0, 100.0)
    assert ax.get_xlabel() == "method" and ax.get_ylabel() == "final accuracy (%)"
    from matplotlib.collections import PathCollection

    dots = [c for c in ax.collections if isinstance(c, PathCollection)]
    assert sorted(float(y) for c in dots for _, y in c.get_offsets()) == sorted(
        [r.final["test_acc"] for r in runs] + [r.final["train_clean_acc"] for r in runs])
    bars = ax.patches
    error_bars = [*ax.lines, *(c for c in ax.collections if not isinstance(c, PathCollection))]
    assert error_bars and min(c.get_zorder() for c in dots) > max(a.get_zorder() for a in [*bars, *error_bars])
    assert {tuple(c.get_facecolor()[0][:3]) for c in dots} == {(0.0, 0.0, 0.0)}  # black dots ...
    assert {tuple(c.get_edgecolor()[0][:3]) for c in dots} == {(1.0, 1.0, 1.0)}  # ... ringed in white
    fig.canvas.draw()
    assert fig.get_suptitle() == "a title" and inside(fig, fig._suptitle)


def test_thirteen_methods_get_distinct_colour_and_line_style_pairs_with_markers(tmp_path: Path,
                                                                               drawn: list[Any]) -> None:
    styles = sharpness_plot.line_styles(40)
    assert len({(s["color"], s["linestyle"]) for s in styles}) == 40
    for a, b in zip(styles, styles[1:]):  # neighbours differ in both
        assert a["color"] != b["color"] and a["linestyle"] != b["linestyle"]
    runs = fake_runs(METHODS, seeds=2, epochs=1)  # a one-epoch run: one point per line
    title = "mnist1d: 8000 train / 2000 test examples, inputs 40, 10 classes; " * 3  # longer than the picture
    plots.plot_curves(runs, METHODS, tmp_path / "curves.png", title)
    (fig,) = drawn
    for ax in fig.axes:
        assert ax.get_xlabel() == "epoch" and ax.get_ylabel() and ax.get_title()
        lines = ax.get_lines()
        assert len(lines) == len(METHODS) == 14
        assert len({(line.get_color(), line.get_linestyle()) for line in lines}) == 14
        assert all(line.get_marker() not in (None, "None", "") and len(line.get_xdata()) == 1 for line in lines)
        assert list(ax.get_xticks()) == [1]
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [f"{m} (n=2)" for m in METHODS]
    fig.canvas.draw()
    assert inside(fig, fig._suptitle) and inside(fig, legend)


def test_the_landscape_pictures_name_the_split_and_the_sample_count(tmp_path: Path, drawn: list[Any]) -> None:
    pytest.importorskip("mnist1d")
    from flatminima.experiments.cli import main

    data_dir = tmp_path / "data"
    out = tmp_path / "o"
    assert main(["compare", "--num-samples", "200", "--epochs", "1", "--batch-size", "40", "--width", "8",
                 "--threads", "1", "--progress", "none", "--data-dir", str(data_dir), "--seeds", "1",
                 "--methods", "sgd", "sam", "--sharpness", "30", "--keep-checkpoints", "--out", str(out)]) == 0
    landscape = drawn[-1]
    assert landscape.axes[0].get_ylabel() == "train loss (30 train samples)"
    ckpt = next((out / "checkpoints").glob("01_sam*.pt"))
    assert main(["landscape", str(ckpt), "--split", "test", "--samples", "25", "--points", "5",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert drawn[-1].axes[0].get_ylabel() == "test loss (25 test samples)"
    assert main(["landscape", str(ckpt), "--2d", "--samples", "20", "--points", "3", "--out", str(tmp_path / "s2.png")]) == 0
    colour_bar = drawn[-1].axes[1]
    assert colour_bar.get_ylabel() == "train loss (20 train samples)"


def test_plotting_leaves_a_python_callers_matplotlib_backend_alone(tmp_path: Path) -> None:
    pytest.importorskip("mnist1d")
    runs = [r.to_dict() for r in fake_runs(["sgd", "sam"])]
    (tmp_path / "runs.json").write_text(json.dumps(runs))
    script = textwrap.dedent(f"""
        import json, os
        import matplotlib
        matplotlib.use("svg")  # the caller's choice
        from flatminima.experiments import load_dataset
        from flatminima.experiments.plots import plot_all
        from flatminima.experiments.train import RunResult
        load_dataset("mnist1d", {str(tmp_path)!r}, num_samples=100)  # mnist1d imports pyplot
        runs = [RunResult.from_dict(d) for d in json.load(open({str(tmp_path / "runs.json")!r}))]
        plot_all(runs, ["sgd", "sam"], {str(tmp_path)!r}, "t")
        print(matplotlib.get_backend(), os.environ.get("MPLBACKEND"))
        from flatminima.experiments.cli import main
        main(["list"])  # the command's own process: Agg
        print(os.environ.get("MPLBACKEND"))
    """)
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "svg None" and lines[-1] == "Agg"
    assert (tmp_path / "curves.png").read_bytes().startswith(b"\x89PNG")
