"""``report``: the sharpness numbers of a model in one flat dict.

This is what the experiment tool's compare report and the ``sharpness``
command print; every number comes from the public functions of this package
with the same arguments, so it can be reproduced from Python.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from . import _checks as check
from .average_case import average_case_sharpness
from .eigen import check_method, eigenpairs
from .hessian import HessianOperator
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike
from .trace import DEFAULT_SKETCH, check_arguments, estimate_trace
from .worst_case import m_sharpness, one_step_gap, worst_case_sharpness

MEASURES = ("lambda_max", "trace", "gap", "m_sharpness", "worst_case", "average_case")
DEFAULT_MEASURES = ("lambda_max", "trace")


def report(
    model: ModelLike,
    data: DataLike,
    *,
    measures: Iterable[str] = DEFAULT_MEASURES,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    top_k: int = 1,
    trace_method: str = "hutch++",
    sketch: int = DEFAULT_SKETCH,
    min_samples: int = 10,
    max_samples: int = 100,
    rho: float = 0.05,
    m: int | None = None,
    options: Mapping[str, Mapping[str, Any]] | None = None,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> dict[str, Any]:
    """Sharpness measures of ``model`` on ``data`` as a flat, JSON-ready dict.

    Keys (always ``"loss"``, then per measure asked for):

    ========================  =====================================================
    ``lambda_max``            ``lambda_max``, ``lambda_max_iterations``,
                              ``lambda_max_converged``, ``lambda_max_products``
                              (and ``lambda_2`` ... ``lambda_k`` when ``top_k > 1``)
    ``trace``                 ``trace``, ``trace_stderr``, ``trace_samples``,
                              ``trace_products``
    ``gap``                   ``one_step_gap`` (radius ``rho``)
    ``m_sharpness``           ``m_sharpness`` (chunks of ``m``, radius ``rho``)
    ``worst_case``            ``worst_case_sharpness`` (adaptive, p = 2, radius ``rho``)
    ``average_case``          ``average_case_sharpness``, ``average_case_stderr``
    ========================  =====================================================

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        measures: names from :data:`MEASURES` (default ``lambda_max``, ``trace``).
        seed: seeds every random draw.
        method, tol, max_iter, top_k: the eigenvalues
            (:func:`~.eigen.hessian_eigenvalues`: Lanczos or power iteration).
        trace_method, sketch, tol, min_samples, max_samples: the trace
            (:func:`~.trace.hessian_trace`: Hutch++ or Hutchinson).
        rho: radius of the perturbation measures.
        m: chunk size for ``m_sharpness`` (required for it).
        options: per-measure keyword overrides, e.g.
            ``{"worst_case": {"rho": 0.5, "p": "inf"}, "average_case": {"samples": 20}}``.
        cache_graph: see :class:`~.hessian.HessianOperator`; lambda_max and
            trace share one operator.
        progress: see :mod:`.progress`.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> row = flatminima.sharpness.report(model, data, loss_fn=mse)
    >>> round(row["lambda_max"], 2), row["trace"], row["loss"]
    (4.0, 5.0, 1.0)
    """
    measures = list(dict.fromkeys(measures))
    for name in measures:
        check.choice("measure", name, MEASURES)
    check.seed(seed)
    check.positive_int("top_k", top_k)
    check.choice("method", method, ("lanczos", "power"))
    check.choice("trace_method", trace_method, ("hutch++", "hutchinson"))
    if "m_sharpness" in measures and m is None:
        raise ValueError("Invalid m value: None (the m_sharpness measure needs a chunk size m)")
    options = dict(options or {})
    for name in options:
        check.choice("options key", name, MEASURES)
    objective = Objective(model, data, loss_fn)
    out: dict[str, Any] = {}
    with objective.measuring(restore_weights=False):
        out["loss"] = objective.loss()
    if "lambda_max" in measures or "trace" in measures:
        with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
            if "lambda_max" in measures:
                kw = {"method": method, "tol": tol, "max_iter": max_iter, "seed": seed, **options.get("lambda_max", {})}
                check.non_negative("tol", kw["tol"])
                check.positive_int("max_iter", kw["max_iter"])
                check_method(kw["method"], top_k, kw["max_iter"])
                eig = eigenpairs(H, top_k, progress=progress, **kw)
                out["lambda_max"] = eig.eigenvalues[0]
                out["lambda_max_iterations"] = eig.iterations[0]
                out["lambda_max_converged"] = eig.converged[0]
                out["lambda_max_products"] = eig.n_products
                for i, v in enumerate(eig.eigenvalues[1:], start=2):
                    out[f"lambda_{i}"] = v
            if "trace" in measures:
                kw = {"method": trace_method, "sketch": sketch, "tol": tol, "min_samples": min_samples,
                      "max_samples": max_samples, "seed": seed, **options.get("trace", {})}
                check_arguments(kw["method"], kw["sketch"], kw["tol"], kw["min_samples"], kw["max_samples"],
                                kw.get("target_stderr"))
                t = estimate_trace(H, progress=progress, **kw)
                out["trace"] = t.trace
                out["trace_stderr"] = t.stderr
                out["trace_samples"] = t.n_samples
                out["trace_products"] = t.n_products
    if "gap" in measures:
        out["one_step_gap"] = one_step_gap(
            model, objective.batches or data, **{"rho": rho, "loss_fn": loss_fn, **options.get("gap", {})}
        )
    if "m_sharpness" in measures:
        assert m is not None
        out["m_sharpness"] = m_sharpness(
            model, objective.batches or data, **{"m": m, "rho": rho, "loss_fn": loss_fn, "progress": progress, **options.get("m_sharpness", {})}
        )
    if "worst_case" in measures:
        out["worst_case_sharpness"] = worst_case_sharpness(
            model, objective.batches or data,
            **{"rho": rho, "loss_fn": loss_fn, "progress": progress, **options.get("worst_case", {})},
        ).value
    if "average_case" in measures:
        res = average_case_sharpness(
            model, objective.batches or data,
            **{"rho": rho, "seed": seed, "loss_fn": loss_fn, "progress": progress, **options.get("average_case", {})},
        )
        out["average_case_sharpness"] = res.value
        out["average_case_stderr"] = res.stderr
    return out
