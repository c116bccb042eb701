"""Top Hessian eigenvalues by power iteration on Hessian-vector products.

For ``i = 1..k``: start from a random unit vector ``v`` (seeded generator),
orthogonal to the eigenvectors already found, and iterate

    ``lambda = v^T H v``,  ``v <- (I - P) H v / ||(I - P) H v||``

where ``P`` projects on the eigenvectors found so far (deflation by
orthogonalisation), until the relative change of ``lambda`` is below
``tol``, ``|lambda_t - lambda_{t-1}| / (|lambda_{t-1}| + 1e-6) < tol``, or
``max_iter`` products. Defaults ``tol=1e-3``, ``max_iter=100`` are
PyHessian's ``eigenvalues(maxIter=100, tol=1e-3)``.

Power iteration converges to the eigenvalue of largest *magnitude*; near a
minimum that is the largest (positive) one, but at a saddle a large negative
eigenvalue can come out first. The error of ``lambda`` after ``t`` products
shrinks like ``(lambda_2 / lambda_1)^(2t)``: a small spectral gap makes the
rule stop early with a ``lambda`` still below the true value. Lower ``tol``
when you need more digits.

Reference: Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks
through the lens of the Hessian", IEEE BigData 2020, arXiv:1912.07145.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from . import _checks as check
from . import _vectors as V
from .hessian import HessianOperator
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter


@dataclass(frozen=True)
class EigenResult:
    """What :func:`hessian_eigenvalues` found.

    Attributes:
        eigenvalues: the ``k`` eigenvalues in the order found (largest magnitude first).
        iterations: Hessian-vector products spent on each.
        converged: whether each met the ``tol`` rule before ``max_iter``.
        eigenvectors: unit eigenvectors (lists of tensors shaped like the
            parameters), or ``None`` unless asked for.
    """

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]
    eigenvectors: list[list[Tensor]] | None = None

    @property
    def lambda_max(self) -> float:
        return self.eigenvalues[0]


def power_iteration(
    H: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    progress: ProgressLike = None,
) -> tuple[list[float], list[list[Tensor]], list[int], list[bool]]:
    """Power iteration with deflation on an operator (see the module docstring).

    Returns ``(eigenvalues, eigenvectors, iterations, converged)``.
    """
    gen = V.generator(seed)
    values: list[float] = []
    vectors: list[list[Tensor]] = []
    iterations: list[int] = []
    converged: list[bool] = []
    with Reporter(progress, k * max_iter, "lambda_max" if k == 1 else f"top-{k} eigenvalues") as bar:
        for i in range(k):
            v = V.gaussian(H.params, gen)
            V.orthogonalize_(v, vectors)
            V.normalize_(v)
            lam: float | None = None
            done = False
            it = 0
            for it in range(1, max_iter + 1):
                hv = H(v)
                new = V.dot(hv, v)
                bar.update(1, f"lambda_{i + 1} = {new:.6g}")
                V.orthogonalize_(hv, vectors)
                if V.normalize_(hv) == 0.0:  # v in the null space of the deflated H
                    lam, done = new, True
                    break
                v = hv
                if lam is not None and abs(new - lam) / (abs(lam) + 1e-6) < tol:
                    lam, done = new, True
                    break
                lam = new
            bar.update(max_iter - it)
            assert lam is not None
            values.append(lam)
            vectors.append(v)
            iterations.append(it)
            converged.append(done)
    return values, vectors, iterations, converged


def hessian_eigenvalues(
    model: ModelLike,
    data: DataLike,
    k: int = 1,
    *,
    loss_fn: LossFn | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenvalues of the Hessian of ``L`` at ``w``.

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        k: how many eigenvalues (>= 1, at most the number of weights).
        tol: relative-change stopping rule (PyHessian: 1e-3).
        max_iter: most Hessian-vector products per eigenvalue (PyHessian: 100).
        seed: seeds the random starting vectors (CPU generator).
        return_eigenvectors: also return the unit eigenvectors.
        cache_graph: see :class:`~.hessian.HessianOperator`.
        progress: see :mod:`.progress`.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> res = flatminima.sharpness.hessian_eigenvalues(model, data, k=2, loss_fn=mse)
    >>> [round(lam, 2) for lam in res.eigenvalues]  # [lambda_1, lambda_2]
    [4.0, 1.0]
    >>> res.converged
    [True, True]

    The model runs in eval mode; weights, buffers and ``.grad`` are left as
    they were. See the module docstring for convergence and references.
    """
    check.positive_int("k", k)
    check.non_negative("tol", tol)
    check.positive_int("max_iter", max_iter)
    check.seed(seed)
    check.flag("return_eigenvectors", return_eigenvectors)
    objective = Objective(model, data, loss_fn)
    n = sum(p.numel() for p in objective.params)
    if k > n:
        raise ValueError(f"Invalid k value: {k} (the model has only {n} weights)")
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
        values, vectors, iters, conv = power_iteration(H, k, tol=tol, max_iter=max_iter, seed=seed, progress=progress)
    return EigenResult(values, iters, conv, vectors if return_eigenvectors else None)


def lambda_max(
    model: ModelLike,
    data: DataLike,
    *,
    loss_fn: LossFn | None = None,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> float:
    """The top Hessian eigenvalue ``lambda_max`` of ``L`` at ``w`` (power
    iteration; see :func:`hessian_eigenvalues` for the arguments).

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> round(flatminima.sharpness.lambda_max(model, data, loss_fn=mse), 2)
    4.0
    """
    return hessian_eigenvalues(
        model, data, 1, loss_fn=loss_fn, tol=tol, max_iter=max_iter, seed=seed, cache_graph=cache_graph, progress=progress
    ).eigenvalues[0]
