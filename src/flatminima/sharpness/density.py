"""Hessian eigenvalue spectral density by stochastic Lanczos quadrature (SLQ).

The spectral density of the ``n x n`` Hessian is
``phi(t) = (1/n) sum_i delta(t - lambda_i)``. For a probe ``v`` with
``E[v v^T] = I / n`` (a Rademacher or Gaussian vector scaled to unit norm),
``E[v^T f(H) v] = (1/n) tr f(H) = integral f dphi``. ``m`` Lanczos steps
from ``v`` (full reorthogonalisation, :mod:`.lanczos`) give
``T_m = S diag(theta) S^T``; the nodes ``theta_j`` and weights
``w_j = S[0, j]^2`` (they sum to 1) are the ``m``-point Gauss quadrature of
the measure ``sum_i (q_i^T v)^2 delta(t - lambda_i)``, exact for polynomials
``f`` of degree up to ``2m - 1``. Averaging over ``runs`` probes:

    ``phi(t) ~ (1/runs) sum_r sum_j w_{r,j} delta(t - theta_{r,j})``.

So the ``k``-th moment of the quadrature, ``(1/runs) sum_r sum_j w_{r,j}
theta_{r,j}^k`` for ``k <= 2m - 1``, *equals* the Hutchinson estimate
``(1/runs) sum_r v_r^T H^k v_r`` of ``tr(H^k) / n`` (to rounding): unbiased,
with variance ``2 sum_{i != j} (H^k)_ij^2 / (n^2 runs)`` for Rademacher
probes (then ``||z||^2 = n`` exactly). :meth:`SpectralDensity.moment` returns
it.

The density is drawn by replacing each delta by a Gaussian, as PyHessian's
``density_generate`` does (``density_plot.py`` of its repository, not part of
the pip package): on ``num_bins`` points from the mean over runs of the
smallest node minus ``overhead`` to the mean of the largest plus
``overhead``, with variance ``sigma_squared * max(1, hi - lo)``, the result
normalised so that its Riemann sum is 1. Defaults are PyHessian's:
``iterations=100``, ``runs=1``, ``num_bins=10000``, ``sigma_squared=1e-5``,
``overhead=0.01``.

A run stops early on an invariant Krylov space (the quadrature is then
exact) and never takes more steps than there are weights. Memory:
``iterations`` parameter-sized vectors (the basis).

References: Ghorbani, Krishnan, Xiao, "An investigation into neural net
optimization via Hessian eigenvalue density", ICML 2019, arXiv:1901.10159;
Lin, Saad, Yang, "Approximating spectral densities of large matrices", SIAM
Review 58(1), 2016; Golub & Meurant, *Matrices, Moments and Quadrature*,
2010; PyHessian (Yao et al., arXiv:1912.07145).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from . import _checks as check
from . import _vectors as V
from .hessian import HessianOperator
from .lanczos import LanczosRun, lanczos
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter

PROBES = ("rademacher", "gaussian")


@dataclass(frozen=True)
class SpectralDensity:
    """What :func:`hessian_density` found.

    Attributes:
        nodes: per run, the Ritz values ``theta_j`` (ascending).
        weights: per run, the quadrature weights ``w_j`` (summing to 1).
        n_products: Hessian-vector products spent in all (the Lanczos steps).
        dimension: ``n``, the number of trainable weights.
        probe: ``"rademacher"`` or ``"gaussian"``.
    """

    nodes: list[list[float]]
    weights: list[list[float]]
    n_products: int
    dimension: int
    probe: str

    @property
    def runs(self) -> int:
        return len(self.nodes)

    def moment(self, k: int) -> float:
        """``(1/runs) sum_r sum_j w_{r,j} theta_{r,j}^k``, the estimate of
        ``tr(H^k) / n`` (exactly the Hutchinson estimate with the same
        probes while ``k <= 2 * steps - 1``)."""
        check.non_negative_int("k", k)
        return sum(sum(w * t**k for t, w in zip(ts, ws)) for ts, ws in zip(self.nodes, self.weights)) / self.runs

    def density(
        self, *, num_bins: int = 10000, sigma_squared: float = 1e-5, overhead: float = 0.01
    ) -> tuple[list[float], list[float]]:
        """``(grid, density)``: the Gaussian-broadened density (see the module docstring)."""
        return broadened_density(self.nodes, self.weights, num_bins=num_bins, sigma_squared=sigma_squared,
                                 overhead=overhead)

    def to_dict(self) -> dict[str, object]:
        return {"nodes": self.nodes, "weights": self.weights, "n_products": self.n_products,
                "dimension": self.dimension, "probe": self.probe}


def broadened_density(
    nodes: Sequence[Sequence[float]],
    weights: Sequence[Sequence[float]],
    *,
    num_bins: int = 10000,
    sigma_squared: float = 1e-5,
    overhead: float = 0.01,
) -> tuple[list[float], list[float]]:
    """PyHessian's Gaussian broadening of SLQ nodes and weights (one list per
    run): ``(grid, density)`` as lists of floats, the density normalised to
    a Riemann sum of 1 on the grid. See the module docstring."""
    check.positive_int("num_bins", num_bins)
    if num_bins < 2:
        raise ValueError(f"Invalid num_bins value: {num_bins} (a grid needs at least 2 points)")
    check.positive("sigma_squared", sigma_squared)
    check.non_negative("overhead", overhead)
    if not nodes or len(nodes) != len(weights) or any(len(t) != len(w) or not t for t, w in zip(nodes, weights)):
        raise ValueError("nodes and weights must be non-empty lists of equal-length, non-empty runs")
    lo = sum(min(t) for t in nodes) / len(nodes) - overhead
    hi = sum(max(t) for t in nodes) / len(nodes) + overhead
    grid = torch.linspace(lo, hi, num_bins, dtype=torch.float64)
    var = sigma_squared * max(1.0, hi - lo)
    out = torch.zeros(num_bins, dtype=torch.float64)
    for ts, ws in zip(nodes, weights):
        t = torch.tensor(list(ts), dtype=torch.float64)
        w = torch.tensor(list(ws), dtype=torch.float64)
        kernel = torch.exp(-((grid[:, None] - t[None, :]) ** 2) / (2.0 * var)) / math.sqrt(2.0 * math.pi * var)
        out += kernel @ w
    out /= len(nodes)
    total = float(out.sum()) * float(grid[1] - grid[0])
    if total > 0:  # every node far outside the grid leaves nothing to normalise
        out /= total
    return grid.tolist(), out.tolist()


def _probe(kind: str, like: Sequence[torch.Tensor], gen: torch.Generator) -> V.Vector:
    return V.rademacher(like, gen) if kind == "rademacher" else V.gaussian(like, gen)


def spectral_quadrature(
    H: HessianOperator,
    *,
    iterations: int = 100,
    runs: int = 1,
    probe: str = "rademacher",
    seed: int = 0,
    progress: ProgressLike = None,
) -> SpectralDensity:
    """SLQ on an operator (see the module docstring)."""
    gen = V.generator(seed)
    nodes: list[list[float]] = []
    weights: list[list[float]] = []
    products = 0
    n = sum(p.numel() for p in H.params)
    with Reporter(progress, runs * iterations, "spectral density") as bar:

        def report(run: LanczosRun) -> None:
            bar.update(1, f"run {len(nodes) + 1}/{runs}")

        for _ in range(runs):
            run = lanczos(H, _probe(probe, H.params, gen), iterations, on_step=report)
            if run.steps < iterations:  # stopped early on an invariant subspace
                bar.update(iterations - run.steps)
            theta, s = run.ritz()
            nodes.append(theta.tolist())
            weights.append(s[0].pow(2).tolist())
            products += run.steps
    return SpectralDensity(nodes, weights, products, n, probe)


def hessian_density(
    model: ModelLike,
    data: DataLike,
    *,
    loss_fn: LossFn | None = None,
    iterations: int = 100,
    runs: int = 1,
    probe: str = "rademacher",
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> SpectralDensity:
    """The Hessian's eigenvalue spectral density of ``L`` at ``w`` by
    stochastic Lanczos quadrature.

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        iterations: Lanczos steps (products) per run (PyHessian's ``iter``: 100);
            also the most parameter-sized vectors kept.
        runs: independent probes averaged (PyHessian's ``n_v``: 1).
        probe: ``"rademacher"`` (default, PyHessian's) or ``"gaussian"``.
        seed: seeds the probes (CPU generator).
        cache_graph: see :class:`~.hessian.HessianOperator`.
        progress: see :mod:`.progress`.

    Returns a :class:`SpectralDensity`; ``.density()`` gives the broadened
    ``(grid, density)``, ``.moment(k)`` the estimate of ``tr(H^k) / n``, and
    ``plot.plot_density`` draws it.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> sd = flatminima.sharpness.hessian_density(model, data, loss_fn=mse)
    >>> [round(t, 4) for t in sd.nodes[0]], [round(w, 4) for w in sd.weights[0]]
    ([1.0, 4.0], [0.5, 0.5])
    >>> round(sd.moment(1), 4), round(sd.moment(2), 4)  # tr(H) / n, tr(H^2) / n
    (2.5, 8.5)

    The model runs in eval mode; weights, buffers and ``.grad`` are left as they were.
    """
    check.positive_int("iterations", iterations)
    check.positive_int("runs", runs)
    check.choice("probe", probe, PROBES)
    check.seed(seed)
    objective = Objective(model, data, loss_fn)
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
        return spectral_quadrature(H, iterations=iterations, runs=runs, probe=probe, seed=seed, progress=progress)
