"""Measuring flatness: sharpness measures and loss-landscape pictures.

Every measure takes a model and a *fixed* data set — a list of ``(x, y)``
batches, one ``(x, y)`` pair, or a loss callable (see :mod:`.objective`) —
evaluates it with the model in eval mode over the trainable parameters,
leaves weights, buffers and ``.grad`` exactly as they were, and is
deterministic for a given ``seed``.

Curvature (Hessian-vector products, :mod:`.hessian`):
    :func:`hvp`, :func:`lambda_max`, :func:`hessian_eigenvalues` (top-k by
    Lanczos, or power iteration with deflation), :func:`hessian_trace`
    (Hutch++, or Hutchinson), :func:`hessian_density` (the eigenvalue
    spectral density by stochastic Lanczos quadrature).
Perturbation (:mod:`.worst_case`, :mod:`.average_case`):
    :func:`one_step_gap`, :func:`m_sharpness`, :func:`worst_case_sharpness`
    (adaptive, p in {2, inf}), :func:`average_case_sharpness`.
Landscapes (:mod:`.landscape`, :mod:`.directions`, :mod:`.plot`):
    :func:`interpolate`, :func:`slice_1d`, :func:`slice_2d`,
    :func:`random_direction`; PNGs with ``plot.plot_curve`` / ``plot.plot_surface`` /
    ``plot.plot_density``
    (matplotlib, imported only there).
The loss itself: :func:`evaluate_loss`. All at once: :func:`report` -> a flat dict (``lambda_max``, ``trace``, ...).
Command line: :mod:`.cli` (``sharpness`` and ``landscape`` subcommands).

The formulas are in docs/algorithms.md#sharpness-measures and docs/sharpness.md.
"""

from typing import Any

from .average_case import AverageCaseResult, average_case_sharpness
from .density import SpectralDensity, broadened_density, hessian_density
from .directions import normalize_direction_, random_direction
from .eigen import EigenResult, hessian_eigenvalues, lambda_max
from .hessian import HessianOperator, hvp
from .landscape import Curve, Surface, interpolate, linspace, slice_1d, slice_2d
from .objective import Objective, evaluate_loss
from .summary import DEFAULT_MEASURES, MEASURES, report
from .trace import TraceResult, hessian_trace
from .worst_case import SharpnessResult, m_sharpness, one_step_gap, worst_case_sharpness

__all__ = [
    "DEFAULT_MEASURES",
    "MEASURES",
    "AverageCaseResult",
    "Curve",
    "EigenResult",
    "HessianOperator",
    "Objective",
    "SharpnessResult",
    "SpectralDensity",
    "Surface",
    "TraceResult",
    "average_case_sharpness",
    "broadened_density",
    "evaluate_loss",
    "hessian_density",
    "hessian_eigenvalues",
    "hessian_trace",
    "hvp",
    "interpolate",
    "lambda_max",
    "linspace",
    "m_sharpness",
    "normalize_direction_",
    "one_step_gap",
    "random_direction",
    "report",
    "slice_1d",
    "slice_2d",
    "worst_case_sharpness",
]


def __getattr__(name: str) -> Any:
    # ``sharpness.plot`` on first use: matplotlib is imported only by those who draw
    if name == "plot":
        import importlib

        return importlib.import_module(f"{__name__}.plot")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
