"""PNG pictures of landscapes and spectral densities (matplotlib, imported only when called).

The figures are drawn on an Agg canvas directly (``matplotlib.figure.Figure``
with ``FigureCanvasAgg``), without ``pyplot``: no GUI backend is touched and
the global matplotlib state of the caller is left alone (its backend
included). Needs the ``flatminima[cli]`` extra (matplotlib).

:func:`figure`, :func:`save` and :func:`line_styles` are shared with the
experiment plots (:mod:`flatminima.experiments.plots`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .density import SpectralDensity
from .landscape import Curve, Surface


# tab10, spelled out so that choosing styles needs no matplotlib import.
_COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
_DASHES = ("-", "--", "-.", ":")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


def line_styles(n: int) -> list[dict[str, str]]:
    """``n`` line styles (``color``, ``linestyle``, ``marker``) whose
    (colour, line style) pairs are all different for up to 40 lines: a
    method is told apart by its dashes where colours repeat (13 methods, 10
    colours) or cannot be seen (a grey print, colour-blind readers).
    Neighbours differ in both.

    >>> [(s["color"], s["linestyle"]) for s in line_styles(13)][10:]
    [('#1f77b4', '-.'), ('#ff7f0e', ':'), ('#2ca02c', '-')]
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    # i -> (i mod 10, i mod 4) pairs colour and dashes of the same parity (20
    # pairs); the next 20 shift the dashes by one for the other parity.
    return [{"color": _COLOURS[i % 10], "linestyle": _DASHES[(i + (i // 20) % 2) % 4],
             "marker": _MARKERS[i % len(_MARKERS)]} for i in range(n)]


def figure(size: tuple[float, float]) -> Any:
    """A matplotlib ``Figure`` on its own Agg canvas (constrained layout: the
    titles and labels stay inside the picture), touching no global state."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("plotting needs matplotlib: pip install 'flatminima[cli]'") from e
    fig = Figure(figsize=size, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save(fig: Any, path: str | Path, dpi: int) -> Path:
    """Write ``fig`` as a PNG at ``path`` (its folder created)."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def plot_curve(
    curves: Curve | Sequence[Curve],
    path: str | Path,
    *,
    labels: Sequence[str] | None = None,
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str = "loss",
    logy: bool = False,
    dpi: int = 120,
) -> Path:
    """Line plot of one or several :class:`~.landscape.Curve` s, written as a PNG.

    Interpolation curves get dotted vertical lines at ``alpha = 0`` and
    ``alpha = 1`` (the two models); slices one at ``alpha = 0``. Returns the path.

    Example::

        plot_curve([train_curve, test_curve], "interp.png", labels=["train", "test"])
    """
    if isinstance(curves, Curve):
        curves = [curves]
    curves = list(curves)
    if not curves:
        raise ValueError("curves is empty")
    for i, c in enumerate(curves):
        if not isinstance(c, Curve):
            raise TypeError(f"curves[{i}] must be a Curve, got {type(c).__name__}")
    if labels is not None and len(labels) != len(curves):
        raise ValueError(f"labels has {len(labels)} entries for {len(curves)} curves")
    fig = figure((5.5, 3.8) if len(curves) <= 4 else (7.5, 4.5))
    ax = fig.add_subplot()
    for i, (c, style) in enumerate(zip(curves, line_styles(len(curves)))):
        ax.plot(c.alphas, c.losses, label=labels[i] if labels else None, markersize=3.5, lw=1.4,
                markevery=max(1, len(c.alphas) // 10), **style)
    marks = [0.0, 1.0] if curves[0].kind == "interpolation" else [0.0]
    for x in marks:
        ax.axvline(x, color="grey", linestyle=":", linewidth=1)
    if logy and all(v > 0 for c in curves for v in c.losses):
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or ("alpha  (w = (1 - alpha) w_a + alpha w_b)" if curves[0].kind == "interpolation" else "alpha  (w + alpha d)"))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if labels:  # many curves: the legend beside the axes, not over the curves
        ax.legend(fontsize=8, **({"loc": "upper left", "bbox_to_anchor": (1.02, 1.0)} if len(curves) > 4 else {}))
    ax.grid(True, alpha=0.3)
    return save(fig, path, dpi)


def plot_surface(
    surface: Surface,
    path: str | Path,
    *,
    levels: int = 30,
    log: bool = False,
    title: str | None = None,
    zlabel: str = "loss",
    dpi: int = 120,
) -> Path:
    """Contour plot (filled, with contour lines) of a :class:`~.landscape.Surface`,
    written as a PNG; the trained weights (0, 0) are marked. ``log`` plots
    ``log10`` of the loss (needs positive losses). ``zlabel`` names the
    colour bar (say which loss: split and sample count). Returns the path."""
    if not isinstance(surface, Surface):
        raise TypeError(f"surface must be a Surface, got {type(surface).__name__}")
    if len(surface.alphas) < 2 or len(surface.betas) < 2:
        raise ValueError(
            f"a contour plot needs at least 2 x 2 points, got {len(surface.alphas)} x {len(surface.betas)}"
        )
    import numpy as np

    z = np.asarray(surface.losses, dtype=float).T  # rows: betas (y), columns: alphas (x)
    label = zlabel
    if log:
        if not (z > 0).all():
            raise ValueError("log=True needs positive losses")
        z, label = np.log10(z), f"log10 {zlabel}"
    finite = z[np.isfinite(z)]
    fig = figure((5.0, 4.2))
    ax = fig.add_subplot()
    if finite.size and finite.max() > finite.min():
        cs = ax.contourf(surface.alphas, surface.betas, z, levels=levels, cmap="viridis")
        ax.contour(surface.alphas, surface.betas, z, levels=levels, colors="k", linewidths=0.3)
        fig.colorbar(cs, ax=ax, label=label)
    else:  # a flat surface has no contour levels
        ax.pcolormesh(surface.alphas, surface.betas, z, shading="nearest")
    ax.plot([0.0], [0.0], marker="*", color="red", markersize=10)
    ax.set_xlabel("alpha (d_1)")
    ax.set_ylabel("beta (d_2)")
    if title:
        ax.set_title(title)
    ax.set_aspect("equal" if math.isclose(np.ptp(surface.alphas), np.ptp(surface.betas)) else "auto")
    return save(fig, path, dpi)


def plot_density(
    density: SpectralDensity,
    path: str | Path,
    *,
    title: str | None = None,
    num_bins: int = 10000,
    sigma_squared: float = 1e-5,
    overhead: float = 0.01,
    dpi: int = 120,
) -> Path:
    """The Hessian eigenvalue spectral density of a
    :class:`~.density.SpectralDensity`, log-scale density against
    eigenvalue, as PyHessian's ``get_esd_plot`` draws it (``density + 1e-7``
    on a log axis, so empty stretches show as a floor instead of a gap),
    written as a PNG. The broadening arguments are those of
    :meth:`~.density.SpectralDensity.density`. Returns the path."""
    if not isinstance(density, SpectralDensity):
        raise TypeError(f"density must be a SpectralDensity, got {type(density).__name__}")
    grid, values = density.density(num_bins=num_bins, sigma_squared=sigma_squared, overhead=overhead)
    fig = figure((6.4, 4.2))
    ax = fig.add_subplot()
    ax.semilogy(grid, [v + 1e-7 for v in values], linewidth=1)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log scale)")
    ax.set_xlim(grid[0], grid[-1])
    ax.set_title(title or "Hessian eigenvalue spectral density", fontsize=10)
    ax.grid(True, alpha=0.3)
    return save(fig, path, dpi)
