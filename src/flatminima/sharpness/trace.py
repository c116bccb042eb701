"""Hessian trace: Hutch++ (default) or Hutchinson's estimator.

**Hutchinson** (``method="hutchinson"``): ``tr(H) = E[z^T H z]`` for ``z``
with independent Rademacher entries (+-1 with probability 1/2), so

    ``tr(H) ~ (1/K) sum_{k=1..K} z_k^T H z_k``,

one Hessian-vector product per sample. A sample's variance is
``2 sum_{i != j} H_ij^2`` (no diagonal term: Rademacher vectors have the
least variance among such probes).

**Hutch++** (``method="hutch++"``, Meyer, Musco, Musco & Woodruff 2021):
``s = sketch`` products ``H S`` (``S`` Rademacher, ``n x s``) give an
orthonormal basis ``Q`` of their range (Gram-Schmidt, twice; columns that
come out zero, when ``rank(H) < s``, are dropped). Then

    ``tr(H) = tr(Q^T H Q) + tr((I - QQ^T) H (I - QQ^T))``

exactly (the cross terms vanish by cyclicity); the first term costs
``rank(Q)`` products and is exact, the second is estimated by Hutchinson
with the projected probes ``g_k = (I - QQ^T) z_k``. The estimator stays
unbiased; its variance is that of the residual ``(I - QQ^T) H (I - QQ^T)``,
from which the largest eigenvalues (the ones that dominate
``sum_{i != j} H_ij^2`` for a Hessian with outliers) have been removed. When
``rank(H) <= s`` the residual is zero and the trace is exact. Products:
``s + rank(Q) + K``. A sketch of ``s >= n`` (cut to ``n``) spans everything:
the trace is then exact and no sample is drawn.

Both stop by the same rules, applied to the running estimate (Hutch++: the
exact low-rank part plus the running mean of the residual samples), from
``min_samples`` samples on, at most ``max_samples`` samples (Hutch++: residual
samples; its sketch is extra):

* PyHessian's relative change of the running estimate,
  ``|m_K - m_{K-1}| / (|m_{K-1}| + 1e-6) < tol`` (``tol=1e-3``;
  ``tol=0`` switches it off);
* ``target_stderr``: the standard error is at most this (off by default).

The result carries the standard error ``std(samples) / sqrt(K)`` (Hutch++:
of its residual Hutchinson part; the low-rank part adds no variance given
``Q``): the relative-change rule alone says little about the accuracy (the
mean moves by about ``(x_K - m_K) / K`` per sample), the standard error says
how far the estimate may be from ``tr(H)``.

References: M. F. Hutchinson, "A stochastic estimator of the trace of the
influence matrix for Laplacian smoothing splines", 1990; Avron & Toledo,
J. ACM 58(2), 2011; R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff,
"Hutch++: Optimal stochastic trace estimation", SOSA 2021,
arXiv:2010.09649; PyHessian (Yao et al., arXiv:1912.07145).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import _checks as check
from . import _vectors as V
from .hessian import HessianOperator
from .lanczos import KrylovBasis, breakdown_rtol
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter

METHODS = ("hutch++", "hutchinson")
DEFAULT_SKETCH = 10


@dataclass(frozen=True)
class TraceResult:
    """What :func:`hessian_trace` found.

    Attributes:
        trace: the estimate (Hutchinson: ``(1/K) sum_k z_k^T H z_k``;
            Hutch++: ``tr(Q^T H Q)`` plus the mean of the residual samples).
        stderr: the standard error of the sampled part,
            ``std(samples, ddof=1) / sqrt(K)`` (NaN for ``K = 1``).
        n_samples: ``K``, the Hutchinson samples (Hutch++: residual samples).
        converged: whether a stopping rule stopped it before ``max_samples``.
        samples: the ``K`` samples ``g_k^T H g_k``.
        n_products: Hessian-vector products spent in all.
        method: ``"hutch++"`` or ``"hutchinson"``.
        low_rank: Hutch++'s exact part ``tr(Q^T H Q)`` (0 for Hutchinson).
        sketch_rank: the number of columns of ``Q`` (0 for Hutchinson).
    """

    trace: float
    stderr: float
    n_samples: int
    converged: bool
    samples: list[float]
    n_products: int = 0
    method: str = "hutchinson"
    low_rank: float = 0.0
    sketch_rank: int = 0


def _sample(
    draw: Callable[[], float],
    offset: float,
    *,
    tol: float,
    min_samples: int,
    max_samples: int,
    target_stderr: float | None,
    bar: Reporter,
) -> tuple[list[float], bool]:
    """Draw samples until a stopping rule holds for ``offset + mean``."""
    samples: list[float] = []
    mean = 0.0
    for k in range(1, max_samples + 1):
        samples.append(draw())
        previous, mean = mean, mean + (samples[-1] - mean) / k
        bar.update(1, f"trace = {offset + mean:.6g}")
        if k < max(min_samples, 2):
            continue
        if abs(mean - previous) / (abs(offset + previous) + 1e-6) < tol:
            return samples, True
        if target_stderr is not None and statistics.stdev(samples) / math.sqrt(k) <= target_stderr:
            return samples, True
    return samples, False


def _stderr(samples: list[float]) -> float:
    return statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.nan


def hutchinson(
    H: HessianOperator,
    *,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    target_stderr: float | None = None,
    seed: int = 0,
    progress: ProgressLike = None,
) -> TraceResult:
    """Hutchinson's estimator on an operator (see the module docstring)."""
    gen = V.generator(seed)

    def draw() -> float:
        z = V.rademacher(H.params, gen)
        return V.dot(z, H(z))

    with Reporter(progress, max_samples, "Hessian trace") as bar:
        samples, converged = _sample(draw, 0.0, tol=tol, min_samples=min_samples, max_samples=max_samples,
                                     target_stderr=target_stderr, bar=bar)
        bar.update(max_samples - len(samples))
    return TraceResult(statistics.fmean(samples), _stderr(samples), len(samples), converged, samples,
                       n_products=len(samples), method="hutchinson")


def hutch_plus_plus(
    H: HessianOperator,
    *,
    sketch: int = DEFAULT_SKETCH,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    target_stderr: float | None = None,
    seed: int = 0,
    progress: ProgressLike = None,
) -> TraceResult:
    """Hutch++ on an operator (see the module docstring)."""
    gen = V.generator(seed)
    n = sum(p.numel() for p in H.params)
    sketch = min(sketch, n)  # Q can hold at most n directions
    rtol = breakdown_rtol(H.params)
    with Reporter(progress, 2 * sketch + max_samples, "Hessian trace (Hutch++)") as bar:
        q = KrylovBasis(H.params, sketch)
        for _ in range(sketch):
            y = [t.contiguous() for t in H(V.gaussian(H.params, gen))]  # Gaussian: full rank almost surely
            bar.update(1, "sketch")
            scale = V.norm(y)
            q.project_out_(y)
            if V.norm(y) > rtol * scale:  # else H S has rank < sketch: the column adds no direction
                V.normalize_(y)
                q.append(y)
        low = 0.0
        for i in range(q.size):
            qi = q.combine(torch.eye(q.size, dtype=torch.float64)[i])
            low += V.dot(qi, H(qi))
            bar.update(1, "tr(Q^T H Q)")
        if q.size < sketch:
            bar.update(sketch - q.size)
        if q.size == n:  # Q spans everything: tr(Q^T H Q) is the trace, the residual is zero
            bar.update(max_samples)
            return TraceResult(low, 0.0, 0, True, [], n_products=sketch + q.size, method="hutch++",
                               low_rank=low, sketch_rank=q.size)

        def draw() -> float:
            g = [t.contiguous() for t in V.rademacher(H.params, gen)]
            q.project_out_(g)
            return V.dot(g, H(g))

        samples, converged = _sample(draw, low, tol=tol, min_samples=min_samples, max_samples=max_samples,
                                     target_stderr=target_stderr, bar=bar)
        bar.update(max_samples - len(samples))
    return TraceResult(low + statistics.fmean(samples), _stderr(samples), len(samples), converged, samples,
                       n_products=sketch + q.size + len(samples), method="hutch++", low_rank=low,
                       sketch_rank=q.size)


def estimate_trace(
    H: HessianOperator,
    *,
    method: str = "hutch++",
    sketch: int = DEFAULT_SKETCH,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    target_stderr: float | None = None,
    seed: int = 0,
    progress: ProgressLike = None,
) -> TraceResult:
    """``tr(H)`` of an operator by ``method`` (arguments checked by the caller)."""
    if method == "hutch++":
        return hutch_plus_plus(H, sketch=sketch, tol=tol, min_samples=min_samples, max_samples=max_samples,
                               target_stderr=target_stderr, seed=seed, progress=progress)
    return hutchinson(H, tol=tol, min_samples=min_samples, max_samples=max_samples, target_stderr=target_stderr,
                      seed=seed, progress=progress)


def check_arguments(method: str, sketch: int, tol: float, min_samples: int, max_samples: int,
                    target_stderr: float | None) -> None:
    """The trace's arguments, each checked with a message naming the value."""
    check.choice("method", method, METHODS)
    check.positive_int("sketch", sketch)
    check.non_negative("tol", tol)
    check.positive_int("min_samples", min_samples)
    check.positive_int("max_samples", max_samples)
    if min_samples > max_samples:
        raise ValueError(f"Invalid min_samples value: {min_samples} (must be <= max_samples = {max_samples})")
    if target_stderr is not None:
        check.positive("target_stderr", target_stderr)


def hessian_trace(
    model: ModelLike,
    data: DataLike,
    *,
    loss_fn: LossFn | None = None,
    method: str = "hutch++",
    sketch: int = DEFAULT_SKETCH,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    target_stderr: float | None = None,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> TraceResult:
    """Estimate of ``tr(H)`` of ``L`` at ``w`` (Hutch++ or Hutchinson), with its standard error.

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        method: ``"hutch++"`` (default) or ``"hutchinson"``.
        sketch: Hutch++'s sketch size ``s`` (``s + rank(Q)`` extra products;
            default 10; more than the number of weights ``n`` is cut to ``n``,
            and then ``Q`` spans everything and the trace is exact).
        tol: relative change of the running estimate that stops sampling
            (PyHessian: 1e-3; 0 switches the rule off).
        min_samples: samples drawn before a rule is checked (>= 1; the
            rules need two, and the standard error is meaningful only with several).
        max_samples: most samples (PyHessian: 100; Hutch++: residual samples).
        target_stderr: also stop once the standard error is at most this.
        seed: seeds the Rademacher vectors (CPU generator).
        cache_graph: see :class:`~.hessian.HessianOperator`.
        progress: see :mod:`.progress`.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> res = flatminima.sharpness.hessian_trace(model, data, loss_fn=mse, method="hutchinson")
    >>> print(f"tr(H) = {res.trace:.4g} +- {res.stderr:.2g}")  # exact: H is diagonal
    tr(H) = 5 +- 0

    The model runs in eval mode; weights, buffers and ``.grad`` are left as they were.
    """
    check.seed(seed)
    check_arguments(method, sketch, tol, min_samples, max_samples, target_stderr)
    objective = Objective(model, data, loss_fn)
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
        return estimate_trace(H, method=method, sketch=sketch, tol=tol, min_samples=min_samples,
                              max_samples=max_samples, target_stderr=target_stderr, seed=seed, progress=progress)
