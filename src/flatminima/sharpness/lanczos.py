"""The Lanczos process on Hessian-vector products, with full reorthogonalisation.

From a unit vector ``v_1``, step ``j`` computes ``w = H v_j``,
``alpha_j = v_j^T w``, removes from ``w`` its components along every basis
vector found so far (classical Gram-Schmidt, twice: "twice is enough",
Giraud et al. 2005), and takes ``beta_j = ||w||``, ``v_{j+1} = w / beta_j``.
The ``m x m`` tridiagonal matrix ``T_m`` (``alpha`` on the diagonal,
``beta_1..beta_{m-1}`` beside it) is ``V_m^T H V_m``: its eigenvalues (Ritz
values) approximate the extreme eigenvalues of ``H`` after far fewer
products than power iteration, and the squared first components of its
eigenvectors are the Gauss quadrature weights of the spectral measure of
``H`` seen from ``v_1`` (stochastic Lanczos quadrature).

Plain three-term Lanczos loses orthogonality in floating point and then
produces spurious copies of converged Ritz values; keeping the whole basis
and reorthogonalising against it costs ``m`` parameter-sized vectors of
memory and ``O(m n)`` work per step, negligible next to a Hessian-vector
product for the ``m <= 100`` steps used here.

Breakdown: when ``beta_j <= BREAKDOWN_RTOL * max(|alpha|, beta)`` (``100 eps``
of the vectors' dtype) the Krylov space is invariant, the Ritz values are
eigenvalues and the quadrature is exact. The process stops there, or, with
``restart=True``, continues from a fresh random vector orthogonal to the
basis (``T`` is then block-diagonal, with ``beta_j = 0`` between the blocks).
It never takes more steps than ``H`` has dimensions.

Reference: C. Lanczos, J. Res. Nat. Bur. Standards 45, 1950; Golub & Van
Loan, *Matrix Computations*, 4th ed., section 10.1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _vectors as V
from .hessian import HessianOperator

BREAKDOWN_RTOL_EPS = 100.0


class KrylovBasis:
    """Orthonormal vectors stored as rows, one ``(capacity, numel)`` matrix per
    parameter, so projecting on the whole basis is one matrix product per
    parameter instead of one dot product per basis vector and parameter.

    Storage grows by doubling up to ``capacity`` rows.
    """

    def __init__(self, like: Sequence[Tensor], capacity: int) -> None:
        self._shapes = [t.shape for t in like]
        self._capacity = capacity
        self._rows = [torch.empty((min(capacity, 8), t.numel()), dtype=t.dtype, device=t.device) for t in like]
        self.size = 0

    def append(self, v: Sequence[Tensor]) -> None:
        if self.size == self._rows[0].shape[0]:
            grown = min(2 * self.size, self._capacity)
            if grown <= self.size:
                raise ValueError(f"the Krylov basis is full ({self._capacity} vectors)")
            self._rows = [torch.cat([r, r.new_empty((grown - self.size, r.shape[1]))]) for r in self._rows]
        for r, t in zip(self._rows, v):
            r[self.size].copy_(t.reshape(-1))
        self.size += 1

    def coefficients(self, w: Sequence[Tensor]) -> Tensor:
        """``V^T w`` (float64, on the first parameter's device)."""
        k = self.size
        parts = [(r[:k] @ t.reshape(-1)).to(torch.float64) for r, t in zip(self._rows, w)]
        device = parts[0].device
        return torch.stack([p.to(device) for p in parts]).sum(0)

    def project_out_(self, w: Sequence[Tensor]) -> None:
        """``w <- (I - V V^T) w`` in place, twice (classical Gram-Schmidt 2)."""
        if self.size == 0:
            return
        for _ in range(2):
            c = self.coefficients(w)
            for r, t in zip(self._rows, w):
                t.view(-1).sub_(c.to(device=r.device, dtype=r.dtype) @ r[: self.size])

    def combine(self, coeffs: Tensor) -> V.Vector:
        """``V c`` as a vector shaped like the parameters."""
        return [
            (coeffs.to(device=r.device, dtype=r.dtype) @ r[: self.size]).view(shape)
            for r, shape in zip(self._rows, self._shapes)
        ]


@dataclass
class LanczosRun:
    """What :func:`lanczos` computed.

    Attributes:
        alphas: the diagonal of ``T`` (one per step, i.e. per product).
        betas: ``beta_j`` after each step; ``betas[:-1]`` are the off-diagonal
            of ``T`` (0 where a restart began a new block), ``betas[-1]`` the
            norm of the last residual (the convergence bounds use it).
        basis: the Lanczos vectors (``len(alphas)`` of them).
        breakdown: whether the last step ended on an invariant subspace.
    """

    alphas: list[float]
    betas: list[float]
    basis: KrylovBasis
    breakdown: bool

    @property
    def steps(self) -> int:
        return len(self.alphas)

    def ritz(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues (ascending) and eigenvectors of ``T`` (float64, CPU)."""
        return ritz(self.alphas, self.betas)


def ritz(alphas: Sequence[float], betas: Sequence[float]) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of the tridiagonal ``T`` (``alphas`` on the
    diagonal, ``betas[:len(alphas) - 1]`` beside it): ``(theta, S)``, float64."""
    m = len(alphas)
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[: m - 1], dtype=torch.float64)
        t = t + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigh(t)


def breakdown_rtol(v: Sequence[Tensor]) -> float:
    """Relative size under which a vector left after projection counts as zero."""
    eps = max(torch.finfo(t.dtype).eps for t in v)
    return BREAKDOWN_RTOL_EPS * eps


def lanczos(
    H: HessianOperator,
    start: Sequence[Tensor],
    max_steps: int,
    *,
    stop: Callable[[LanczosRun], bool] | None = None,
    restart: Callable[[], V.Vector] | None = None,
    on_step: Callable[[LanczosRun], None] | None = None,
) -> LanczosRun:
    """Run at most ``max_steps`` Lanczos steps (products) from ``start``.

    ``stop(run)`` is asked after every step; ``restart()`` draws the next
    start after a breakdown (``None``: stop at a breakdown); ``on_step(run)``
    reports progress. See the module docstring.
    """
    n = sum(p.numel() for p in H.params)
    max_steps = min(max_steps, n)  # a Krylov space has at most n dimensions
    v = [t.detach().clone().contiguous() for t in start]
    if V.normalize_(v) == 0.0:
        raise ValueError("the Lanczos start vector is zero")
    run = LanczosRun([], [], KrylovBasis(v, max_steps), False)
    run.basis.append(v)
    rtol = breakdown_rtol(v)
    scale = 0.0
    while True:
        w = [t.contiguous() for t in H(v)]
        alpha = V.dot(w, v)
        run.basis.project_out_(w)  # removes alpha v_j, beta v_{j-1} and the rounding that crept in
        beta = V.norm(w)
        scale = max(scale, abs(alpha), beta)
        run.alphas.append(alpha)
        run.betas.append(beta)
        run.breakdown = beta <= rtol * scale
        if on_step is not None:
            on_step(run)
        if run.steps >= max_steps or (stop is not None and stop(run)):
            return run
        if run.breakdown:
            if restart is None:
                return run
            w = [t.contiguous() for t in restart()]
            run.basis.project_out_(w)
            if V.normalize_(w) == 0.0:  # pragma: no cover - a random vector inside a proper subspace
                return run
            run.betas[-1] = 0.0  # a new block of T
        else:
            for t in w:
                t.div_(beta)
        v = w
        run.basis.append(v)
