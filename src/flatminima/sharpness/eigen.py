"""Top Hessian eigenvalues: Lanczos (default) or power iteration.

**Lanczos** (``method="lanczos"``, see :mod:`.lanczos`): from one random unit
vector (seeded generator), ``m`` Lanczos steps with full reorthogonalisation
give ``T_m = V_m^T H V_m``; its eigenpairs ``(theta_i, s_i)`` give Ritz pairs
``(theta_i, y_i = V_m s_i)`` with the residual
``||H y_i - theta_i y_i|| = beta_m |s_i[m]|``. The run stops as soon as each
of the ``k`` Ritz values of largest magnitude has

    ``beta_m |s_i[m]| <= tol * |theta_i|``

or after ``max_iter`` products. For a symmetric ``H`` some eigenvalue lies
within the residual of each Ritz value, so ``tol`` bounds the relative error
of each returned value (in practice the error is about
``residual^2 / gap``, far below ``tol``). One product per step, shared by all
``k`` eigenvalues; memory ``m`` parameter-sized vectors (the basis). A
Krylov method from one start sees each *distinct* eigenvalue once: an
eigenvalue of multiplicity 2 among the top ``k`` appears once (the next
distinct one takes its place). Use ``method="power"`` when top eigenvalues
may be exactly repeated.

**Power iteration** (``method="power"``, PyHessian's): for ``i = 1..k``,
start from a random unit vector ``v`` orthogonal to the eigenvectors already
found and iterate

    ``lambda = v^T H v``,  ``v <- (I - P) H v / ||(I - P) H v||``

where ``P`` projects on the eigenvectors found so far (deflation by
orthogonalisation), until the relative change of ``lambda`` is below
``tol``, ``|lambda_t - lambda_{t-1}| / (|lambda_{t-1}| + 1e-6) < tol``, or
``max_iter`` products. Defaults ``tol=1e-3``, ``max_iter=100`` are
PyHessian's ``eigenvalues(maxIter=100, tol=1e-3)``. The error of ``lambda``
after ``t`` products shrinks like ``(lambda_2 / lambda_1)^(2t)``: a small
spectral gap makes the rule stop early with a ``lambda`` still below the
true value. Lanczos converges like ``exp(-4 t sqrt(gap))`` instead
(Kaniel-Paige-Saad), which is why it needs several times fewer products.

Both return the eigenvalues of largest *magnitude*: near a minimum those are
the largest (positive) ones, but at a saddle a large negative eigenvalue can
come out first.

References: Yao, Gholami, Keutzer, Mahoney, "PyHessian: Neural networks
through the lens of the Hessian", IEEE BigData 2020, arXiv:1912.07145;
Saad, *Numerical Methods for Large Eigenvalue Problems*, 2nd ed., 2011,
chapter 6 (Lanczos, residual bounds, convergence).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from . import _checks as check
from . import _vectors as V
from .hessian import HessianOperator
from .lanczos import LanczosRun, lanczos
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter


@dataclass(frozen=True)
class EigenResult:
    """What :func:`hessian_eigenvalues` found.

    Attributes:
        eigenvalues: the ``k`` eigenvalues, largest magnitude first (power
            iteration: in the order found, which is nearly always that).
        iterations: Hessian-vector products spent on each (power iteration);
            with Lanczos every value shares the one run, so each entry is
            that run's length.
        converged: whether each met the ``tol`` rule before ``max_iter``.
        eigenvectors: unit eigenvectors (lists of tensors shaped like the
            parameters), or ``None`` unless asked for.
        n_products: Hessian-vector products spent in all.
        method: ``"lanczos"`` or ``"power"``.
    """

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]
    eigenvectors: list[list[Tensor]] | None = None
    n_products: int = field(default=0)
    method: str = "power"

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


def _wanted(theta: Tensor, k: int) -> list[int]:
    """Indices of the ``k`` Ritz values of largest magnitude, largest first."""
    return torch.argsort(theta.abs(), descending=True, stable=True)[:k].tolist()


def _lanczos_converged(run: LanczosRun, k: int, tol: float) -> list[bool]:
    theta, s = run.ritz()
    if theta.numel() < k:
        return [False] * k
    residual = (run.betas[-1] * s[-1]).abs()  # ||H y_i - theta_i y_i|| = beta_m |s_i[m]|
    return [bool(residual[i] <= tol * abs(theta[i])) or run.breakdown for i in _wanted(theta, k)]


def lanczos_eigenpairs(
    H: HessianOperator,
    k: int = 1,
    *,
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
    progress: ProgressLike = None,
) -> EigenResult:
    """Lanczos with full reorthogonalisation on an operator (see the module docstring)."""
    gen = V.generator(seed)
    with Reporter(progress, max_iter, "lambda_max" if k == 1 else f"top-{k} eigenvalues") as bar:

        def report(run: LanczosRun) -> None:
            bar.update(1, f"lambda_1 ~ {max(run.alphas, key=abs):.6g}" if run.steps == 1 else "")

        run = lanczos(
            H, V.gaussian(H.params, gen), max_iter,
            stop=lambda r: all(_lanczos_converged(r, k, tol)),
            restart=lambda: V.gaussian(H.params, gen),
            on_step=report,
        )
        if run.steps < max_iter:
            bar.update(max_iter - run.steps)
    theta, s = run.ritz()
    if theta.numel() < k:  # pragma: no cover - k <= n and restarts fill the space
        raise ValueError(f"Lanczos found {theta.numel()} eigenvalues, {k} asked for")
    idx = _wanted(theta, k)
    vectors = None
    if return_eigenvectors:
        vectors = [run.basis.combine(s[:, i]) for i in idx]
        for v in vectors:
            V.normalize_(v)
    return EigenResult(
        [float(theta[i]) for i in idx], [run.steps] * k, _lanczos_converged(run, k, tol), vectors,
        n_products=run.steps, method="lanczos",
    )


METHODS = ("lanczos", "power")


def eigenpairs(
    H: HessianOperator,
    k: int = 1,
    *,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    return_eigenvectors: bool = False,
    progress: ProgressLike = None,
) -> EigenResult:
    """The ``k`` largest-magnitude eigenvalues of an operator by ``method``."""
    if method == "lanczos":
        return lanczos_eigenpairs(H, k, tol=tol, max_iter=max_iter, seed=seed,
                                  return_eigenvectors=return_eigenvectors, progress=progress)
    values, vectors, iters, conv = power_iteration(H, k, tol=tol, max_iter=max_iter, seed=seed, progress=progress)
    return EigenResult(values, iters, conv, vectors if return_eigenvectors else None,
                       n_products=sum(iters), method="power")


def hessian_eigenvalues(
    model: ModelLike,
    data: DataLike,
    k: int = 1,
    *,
    loss_fn: LossFn | None = None,
    method: str = "lanczos",
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
        method: ``"lanczos"`` (default) or ``"power"`` (PyHessian's power
            iteration with deflation).
        tol: Lanczos: each Ritz value's residual ``<= tol * |value|``, a
            bound on its relative error; power: relative change of the
            estimate between two products (PyHessian: 1e-3).
        max_iter: Lanczos: most products (steps) in all, and the most
            vectors kept; power: most products per eigenvalue (PyHessian: 100).
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
    check_method(method, k, max_iter)
    objective = Objective(model, data, loss_fn)
    n = sum(p.numel() for p in objective.params)
    if k > n:
        raise ValueError(f"Invalid k value: {k} (the model has only {n} weights)")
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph) as H:
        return eigenpairs(H, k, method=method, tol=tol, max_iter=max_iter, seed=seed,
                          return_eigenvectors=return_eigenvectors, progress=progress)


def check_method(method: str, k: int, max_iter: int) -> None:
    """``method`` is known and, for Lanczos, ``max_iter`` leaves room for ``k`` values."""
    check.choice("method", method, METHODS)
    if method == "lanczos" and max_iter < k:
        raise ValueError(
            f"Invalid max_iter value: {max_iter} (Lanczos needs at least k = {k} steps for k eigenvalues; "
            f"raise max_iter or use method='power', whose max_iter counts per eigenvalue)"
        )


def lambda_max(
    model: ModelLike,
    data: DataLike,
    *,
    loss_fn: LossFn | None = None,
    method: str = "lanczos",
    tol: float = 1e-3,
    max_iter: int = 100,
    seed: int = 0,
    cache_graph: bool | None = None,
    progress: ProgressLike = None,
) -> float:
    """The top Hessian eigenvalue ``lambda_max`` of ``L`` at ``w`` (Lanczos,
    or ``method="power"``; see :func:`hessian_eigenvalues` for the arguments).

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> round(flatminima.sharpness.lambda_max(model, data, loss_fn=mse), 2)
    4.0
    """
    return hessian_eigenvalues(
        model, data, 1, loss_fn=loss_fn, method=method, tol=tol, max_iter=max_iter, seed=seed, cache_graph=cache_graph, progress=progress
    ).eigenvalues[0]
