"""Hessian trace by Hutchinson's estimator.

``tr(H) = E[z^T H z]`` for ``z`` with independent Rademacher entries (+-1
with probability 1/2), so

    ``tr(H) ~ (1/K) sum_{k=1..K} z_k^T H z_k``,

one Hessian-vector product per sample. A sample's variance is
``2 sum_{i != j} H_ij^2`` (no diagonal term: Rademacher vectors have the
least variance among such probes). The stopping rule is PyHessian's
relative change of the running mean,
``|m_K - m_{K-1}| / (|m_{K-1}| + 1e-6) < tol``, checked from ``min_samples``
on, with at most ``max_samples`` samples (PyHessian: ``tol=1e-3``,
``maxIter=100``). The result carries the standard error
``std(samples) / sqrt(K)``: the stopping rule alone says little about the
accuracy (the mean moves by about ``(x_K - m_K) / K`` per sample), the
standard error says how far the estimate may be from ``tr(H)``.

References: M. F. Hutchinson, "A stochastic estimator of the trace of the
influence matrix for Laplacian smoothing splines", 1990; Avron & Toledo,
J. ACM 58(2), 2011; PyHessian (Yao et al., arXiv:1912.07145).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

from . import _checks as check
from . import _vectors as V
from .hessian import HessianOperator
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter


@dataclass(frozen=True)
class TraceResult:
    """What :func:`hessian_trace` found.

    Attributes:
        trace: the estimate ``(1/K) sum_k z_k^T H z_k``.
        stderr: its standard error ``std(samples, ddof=1) / sqrt(K)`` (NaN for ``K = 1``).
        n_samples: ``K``.
        converged: whether the ``tol`` rule stopped it before ``max_samples``.
        samples: the ``z_k^T H z_k``.
    """

    trace: float
    stderr: float
    n_samples: int
    converged: bool
    samples: list[float]


def hutchinson(
    H: HessianOperator,
    *,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    seed: int = 0,
    progress: ProgressLike = None,
) -> TraceResult:
    """Hutchinson's estimator on an operator (see the module docstring)."""
    gen = V.generator(seed)
    samples: list[float] = []
    mean = 0.0
    converged = False
    with Reporter(progress, max_samples, "Hessian trace") as bar:
        for k in range(1, max_samples + 1):
            z = V.rademacher(H.params, gen)
            samples.append(V.dot(z, H(z)))
            previous, mean = mean, mean + (samples[-1] - mean) / k
            bar.update(1, f"trace = {mean:.6g}")
            if k >= max(min_samples, 2) and abs(mean - previous) / (abs(previous) + 1e-6) < tol:
                converged = True
                break
        bar.update(max_samples - len(samples))
    mean = statistics.fmean(samples)
    stderr = statistics.stdev(samples) / math.sqrt(len(samples)) if len(samples) > 1 else math.nan
    return TraceResult(mean, stderr, len(samples), converged, samples)


def hessian_trace(
    model: ModelLike,
    data: DataLike,
    *,
    loss_fn: LossFn | None = None,
    tol: float = 1e-3,
    min_samples: int = 10,
    max_samples: int = 100,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> TraceResult:
    """Hutchinson estimate of ``tr(H)`` of ``L`` at ``w``, with its standard error.

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        tol: relative change of the running mean that stops sampling (PyHessian: 1e-3).
        min_samples: samples drawn before the rule is checked (>= 1; the
            rule needs two, and the standard error is meaningful only with several).
        max_samples: most samples (PyHessian: 100).
        seed: seeds the Rademacher vectors (CPU generator).
        cache_graph: see :class:`~.hessian.HessianOperator`.
        progress: see :mod:`.progress`.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> res = flatminima.sharpness.hessian_trace(model, data, loss_fn=mse)
    >>> print(f"tr(H) = {res.trace:.4g} +- {res.stderr:.2g}")  # exact: H is diagonal
    tr(H) = 5 +- 0

    The model runs in eval mode; weights, buffers and ``.grad`` are left as they were.
    """
    check.non_negative("tol", tol)
    check.positive_int("min_samples", min_samples)
    check.positive_int("max_samples", max_samples)
    if min_samples > max_samples:
        raise ValueError(f"Invalid min_samples value: {min_samples} (must be <= max_samples = {max_samples})")
    check.seed(seed)
    objective = Objective(model, data, loss_fn)
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
        return hutchinson(H, tol=tol, min_samples=min_samples, max_samples=max_samples, seed=seed, progress=progress)
