"""Fisher SAM: the neighbourhood is a ball of the (diagonal) Fisher metric."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from ._base import GroupView, SharpnessAware, StepContext


class FisherSAM(SharpnessAware):
    r"""Fisher SAM: ``eps = rho F^-1 g / sqrt(g^T F^-1 g)`` with ``F = diag(1 + eta g^2)``.

    Each step, with ``g = grad L(w)`` from the clean pass::

        f   = 1 + eta * g^2                      # elementwise, from the mini-batch gradient
        v   = g / sqrt(f)                        # ||v||^2 = g^T F^-1 g
        eps = rho * (g / f) / (||v|| + eps0)     # so eps^T F eps = rho^2
        g_p = grad L(w + eps)                    # perturbed pass
        w   = Base(w, g_p)

    ``||eps||_F = rho`` (the Fisher norm), not ``||eps||_2 = rho``; ``eta = 0``
    is SAM with the same ``rho`` (bit for bit).

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        rho: radius ``gamma`` of the Fisher ball (default 0.1).
        eta: weight of ``g^2`` in the diagonal Fisher (default 1.0).
        norm_eps: denominator offset ``eps0`` (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    Memory: one copy of the parameters during the step (``sqrt(f)`` lives in
    the scratch buffer that then holds the saved ``w``), none between steps.

    Example::

        opt = FisherSAM(model.parameters(), torch.optim.SGD, rho=0.1, eta=1.0, lr=0.1, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

    Reference:
        Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and
        Sharpness Aware Minimisation. ICML 2022, arXiv:2206.04920.

    Departures: no official code exists; this follows the paper's
    ``sqrt(g^T F^-1 g)`` normalisation (one third-party version instead
    rescales ``F^-1 g`` to Euclidean norm ``rho``, a different radius).
    The exact (rho, eta) grid of the paper was not verified.
    """

    group_checks = {"rho": V.non_negative, "eta": V.non_negative, "norm_eps": V.positive}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.1,
        eta: float = 1.0,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, eta=eta, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )

    def _needs_scratch(self, view: GroupView) -> bool:
        return True  # 1 + eta g^2

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if view.group["eta"] == 0.0:  # f = 1: SAM
            return False
        T.sqrt_one_plus_sq_(scratch, view.grads, view.group["eta"], ctx.foreach)
        T.div_elementwise_(view.grads, scratch, ctx.foreach)
        return True

    def _ascent_finish(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        if view.group["eta"] != 0.0:
            T.div_elementwise_(view.grads, scratch, ctx.foreach)
