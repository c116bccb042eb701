"""Worst-case sharpness: the one-step gap, m-sharpness and adaptive sharpness.

All three measure how much the loss can rise inside a small ball around
``w``; they differ in the ball and in how the inside maximum is found.

**Ball.** With the scale ``c`` (``c = |w| + eta`` elementwise when
``adaptive``, else ``c = 1``) and ``p`` in {2, inf}:
``B = { delta : ||delta / c||_p <= rho }``. ``c = 1, p = 2`` is SAM's ball;
``c = |w|`` (``eta = 0``) is the adaptive ball of ASAM (Kwon et al., ICML'21)
and Andriushchenko et al. (ICML'23); ``eta > 0`` keeps zero weights movable,
as the library's ``adaptive=True`` optimizers do (docs/algorithms.md#2-asam).

**Inner maximum.** In the scaled coordinates ``u = delta / c`` the ball is a
plain l_p ball and the gradient is ``s = c * grad L(w + delta)``. Starting
from ``u = 0``, step ``t`` is a normalised gradient-ascent step, projected on
the ball:

* ``p = 2``:   ``u <- Proj_2(u + alpha_t * s / ||s||_2)``  (rescale to norm ``rho``),
* ``p = inf``: ``u <- clip(u + alpha_t * sign(s), -rho, rho)``.

The first step has ``alpha_0 = rho``: its ``delta`` is the maximiser of the
first-order expansion, ``rho * g / ||g||`` for SAM's ball, ``rho c^2 g /
||c g||`` (ASAM) or ``rho c sign(g)`` for ``p = inf``. Later steps start at
``step_size`` (default ``rho / 2``) and halve it whenever a step does not
raise the loss, the step then being undone; the best iterate is kept, so
more steps never give a lower value than one step. This is a simplified
Auto-PGD (Croce & Hein, ICML'20), which Andriushchenko et al. run for about
20 steps; each step costs one forward-backward pass per chunk.

**Chunks.** Over a data set of ``N`` samples cut into disjoint chunks ``M``
(``m`` samples each, or the batches as given when ``m`` is ``None``):

``S = sum_M |M|/N * ( max_{delta in B} L_M(w + delta) - L_M(w) )``

(the expectation over ``M`` of Andriushchenko et al.; Foret et al.'s
m-sharpness ``(1/n) sum_M max sum_{s in M} [l_s(w + eps) - l_s(w)]``, whose
remainder chunk counts with its size).

* :func:`one_step_gap`: one chunk (the whole data), SAM's ball, one step:
  ``h(w) = L(w + rho g/||g||) - L(w)`` (GSAM's surrogate gap; about
  ``rho ||g||`` away from a minimum, ``rho^2 lambda_max / 2`` at one).
* :func:`m_sharpness`: chunks of ``m`` samples, SAM's ball, one step by default.
* :func:`worst_case_sharpness`: any of the above balls, several steps.

Every function restores the weights exactly (copy back) and runs the model
in eval mode. References: Foret et al., ICLR'21 (arXiv:2010.01412);
Zhuang et al., ICLR'22 (arXiv:2203.08065); Kwon et al., ICML'21
(arXiv:2102.11600); Andriushchenko et al., ICML'23 (arXiv:2302.07011).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from . import _checks as check
from . import _vectors as V
from .objective import DataLike, LossFn, ModelLike, Objective
from .progress import ProgressLike, Reporter


@dataclass(frozen=True)
class SharpnessResult:
    """A chunked worst-case sharpness.

    Attributes:
        value: ``sum_M |M|/N (L_M(w + delta_M) - L_M(w))``.
        loss: ``L(w)``.
        chunk_values: ``L_M(w + delta_M) - L_M(w)`` per chunk.
        chunk_weights: ``|M| / N`` per chunk.
        deltas: the ``delta_M`` (lists of tensors like the parameters) when asked for.
    """

    value: float
    loss: float
    chunk_values: list[float]
    chunk_weights: list[float]
    deltas: list[list[Tensor]] | None = None


def ball_scale(params: list[Tensor], adaptive: bool, eta: float) -> list[Tensor] | None:
    """``c = |w| + eta`` (``adaptive``) or ``None`` for ``c = 1``."""
    if not adaptive:
        return None
    return [p.detach().abs().add_(eta) for p in params]


def _step(
    u: list[Tensor], grad: list[Tensor], c: list[Tensor] | None, alpha: float, rho: float, p: float, eps: float, project: bool
) -> list[Tensor]:
    s = grad if c is None else [g * ci for g, ci in zip(grad, c)]
    if p == 2:
        n = V.norm(s)
        new = [ui + si * (alpha / (n + eps)) for ui, si in zip(u, s)]
        if project:
            nn_ = V.norm(new)
            if nn_ > rho:
                new = [t * (rho / nn_) for t in new]
        return new
    return [(ui + alpha * torch.sign(si)).clamp_(-rho, rho) for ui, si in zip(u, s)]


def _ascend(
    chunk: Objective,
    w0: list[Tensor],
    c: list[Tensor] | None,
    rho: float,
    p: float,
    steps: int,
    step_size: float,
    eps: float,
    bar: Reporter,
) -> tuple[float, float, list[Tensor]]:
    """``(L_M(w), max found L_M(w + delta), delta)``; weights back at ``w0`` after."""
    loss0, g = chunk.loss_and_grad()
    u = V.zeros_like(w0)
    grad: list[Tensor] | None = g
    best = -math.inf
    alpha = rho
    for t in range(steps):
        assert grad is not None
        cand = _step(u, grad, c, alpha, rho, p, eps, project=t > 0)
        delta = cand if c is None else [ui * ci for ui, ci in zip(cand, c)]
        chunk.set_weights(w0, delta)
        if t < steps - 1:
            value, cand_grad = chunk.loss_and_grad()
        else:
            value, cand_grad = chunk.loss(), None
        bar.update(1, f"gap = {value - loss0:.4g}")
        if t == 0 or value > best:
            best, u, grad = value, cand, cand_grad
            if t == 0:
                alpha = step_size
        else:
            alpha /= 2
    chunk.set_weights(w0)
    delta = u if c is None else [ui * ci for ui, ci in zip(u, c)]
    return loss0, best, delta


def _chunked(
    objective: Objective,
    *,
    rho: float,
    p: float,
    adaptive: bool,
    eta: float,
    steps: int,
    step_size: float | None,
    m: int | None,
    whole: bool,
    eps: float,
    return_deltas: bool,
    progress: ProgressLike,
    desc: str,
) -> SharpnessResult:
    chunks = [(objective, 1.0)] if whole else objective.chunks(m)
    values: list[float] = []
    weights: list[float] = []
    deltas: list[list[Tensor]] = []
    total = loss = 0.0
    with objective.measuring() as w0, Reporter(progress, steps * len(chunks), desc) as bar:
        c = ball_scale(objective.params, adaptive, eta)
        for chunk, weight in chunks:
            l0, best, delta = _ascend(chunk, w0, c, rho, p, steps, rho / 2 if step_size is None else step_size, eps, bar)
            values.append(best - l0)
            weights.append(weight)
            total += weight * (best - l0)
            loss += weight * l0
            if return_deltas:
                deltas.append(delta)
    return SharpnessResult(total, loss, values, weights, deltas if return_deltas else None)


def _common_checks(rho: float, steps: int, eps: float) -> None:
    check.non_negative("rho", rho)
    check.positive_int("steps", steps)
    check.non_negative("eps", eps)


def one_step_gap(
    model: ModelLike, data: DataLike, rho: float = 0.05, *, loss_fn: LossFn | None = None, eps: float = 1e-12
) -> float:
    """GSAM's surrogate gap ``h(w) = L(w + rho g/||g||) - L(w)``, ``g = grad L(w)``.

    On the whole data set (one chunk), ``||g||`` the global l2 norm over the
    trainable parameters, ``eps`` added to it (the library's denominator
    offset; 0 gives the formula as printed).

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> h = flatminima.sharpness.one_step_gap(model, data, rho=0.1, loss_fn=mse)
    >>> round(h, 4)  # g = (-1, -2): rho ||g|| + rho^2 (g^T H g) / (2 ||g||^2) = 0.1 sqrt(5) + 0.017
    0.2406

    Reference: Zhuang et al., "Surrogate Gap Guided Sharpness-Aware
    Minimization", ICLR'22, arXiv:2203.08065.
    """
    _common_checks(rho, 1, eps)
    objective = Objective(model, data, loss_fn)
    return _chunked(
        objective, rho=rho, p=2, adaptive=False, eta=0.0, steps=1, step_size=None, m=None, whole=True,
        eps=eps, return_deltas=False, progress=None, desc="one-step gap",
    ).value


def m_sharpness(
    model: ModelLike,
    data: DataLike,
    m: int,
    rho: float = 0.05,
    *,
    steps: int = 1,
    loss_fn: LossFn | None = None,
    eps: float = 1e-12,
    progress: ProgressLike = None,
) -> float:
    """Foret et al.'s m-sharpness with SAM's ball and ``eps_M = rho g_M/||g_M||``.

    ``S_m = sum_M |M|/N (L_M(w + eps_M) - L_M(w))`` over disjoint chunks of
    ``m`` consecutive samples of ``data`` (in order, across batches; the
    last chunk holds the remainder), ``g_M = grad L_M(w)``. ``m >= N`` gives
    :func:`one_step_gap`. ``steps > 1`` replaces the one step by projected
    ascent (see the module docstring).

    Example::

        s = flatminima.sharpness.m_sharpness(model, batches, m=16, rho=0.05)

    Reference: Foret et al., "Sharpness-Aware Minimization for Efficiently
    Improving Generalization", ICLR'21, arXiv:2010.01412 (section 4.1).
    """
    check.positive_int("m", m)
    _common_checks(rho, steps, eps)
    objective = Objective(model, data, loss_fn)
    return _chunked(
        objective, rho=rho, p=2, adaptive=False, eta=0.0, steps=steps, step_size=None, m=m, whole=False,
        eps=eps, return_deltas=False, progress=progress, desc=f"{m}-sharpness",
    ).value


def worst_case_sharpness(
    model: ModelLike,
    data: DataLike,
    rho: float,
    *,
    p: float | str = 2,
    adaptive: bool = True,
    eta: float = 0.01,
    steps: int = 10,
    step_size: float | None = None,
    m: int | None = None,
    loss_fn: LossFn | None = None,
    eps: float = 1e-12,
    return_deltas: bool = False,
    progress: ProgressLike = None,
) -> SharpnessResult:
    """Adaptive worst-case sharpness ``S_max^rho(w; c, p)``.

    ``S = sum_M |M|/N max_{||delta / c||_p <= rho} [L_M(w + delta) - L_M(w)]``
    with ``c = |w| + eta`` (``adaptive=True``) or ``c = 1``, the maximum
    found by ``steps`` projected ascent steps (module docstring).

    Args:
        model, data, loss_fn: the objective (see :mod:`.objective`).
        rho: radius of the ball (>= 0).
        p: 2 or ``inf`` (``float("inf")`` or ``"inf"``).
        adaptive: ``c = |w| + eta`` (True) or ``c = 1``.
        eta: offset of the adaptive scale (>= 0; 0 gives ``c = |w|``).
        steps: ascent steps (>= 1; 1 gives the first-order maximiser).
        step_size: first step size after the first step (default ``rho / 2``).
        m: chunk size; ``None`` takes the batches of ``data`` as the chunks.
        eps: offset of the l2 normalisation.
        return_deltas: keep the ``delta`` found for each chunk.
        progress: see :mod:`.progress`.

    Example::

        res = flatminima.sharpness.worst_case_sharpness(model, batches, rho=0.5, p=2)
        res.value, res.chunk_values

    Reference: Andriushchenko, Croce, Müller, Hein, Flammarion, "A modern
    look at the relationship between sharpness and generalization",
    ICML'23, arXiv:2302.07011.
    """
    p = check.p_norm(p)
    check.flag("adaptive", adaptive)
    check.non_negative("eta", eta)
    _common_checks(rho, steps, eps)
    if step_size is not None:
        check.positive("step_size", step_size)
    check.optional_positive_int("m", m)
    check.flag("return_deltas", return_deltas)
    objective = Objective(model, data, loss_fn)
    return _chunked(
        objective, rho=rho, p=p, adaptive=adaptive, eta=eta, steps=steps, step_size=step_size, m=m, whole=False,
        eps=eps, return_deltas=return_deltas, progress=progress, desc="worst-case sharpness",
    )
