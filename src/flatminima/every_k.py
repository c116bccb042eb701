"""SAM every k steps: the base optimizer in between."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validate as V
from ._base import StepContext
from .sam import SAM


class SAMEveryK(SAM):
    r"""SAM on every ``k``-th step, the plain base optimizer on the others.

    With ``t`` the number of steps taken so far (0 at the first step) and
    ``g = grad L(w)`` from the clean pass::

        t % k == 0:  eps = rho * v / (||v|| + eps0)   # SAM's eps (v as in SAM:
                     g_p = grad L(w + eps)            # g, T_w g, GC(g))
                     w   = Base(w, g_p)
        otherwise:   w   = Base(w, g)                 # one pass, no perturbation

    On the other steps ``first_step`` returns False and ``step(closure)``
    calls the closure once. ``t`` counts steps taken (a step skipped for a
    non-finite gradient does not count, so the next step is tried again at
    the same ``t``); it lives in ``method_state["step"]`` and is saved by
    ``state_dict()``, so a run resumed in the middle of a period continues
    bit for bit. ``k = 1`` is SAM bit for bit. It is LookSAM with
    ``alpha = 0`` (see :class:`flatminima.LookSAM`), without LookSAM's
    stored vector.

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        k: period of the SAM steps, an int >= 1 (default 5). One value for
            the whole optimizer (not per group); it is not part of the state
            dict: build a resumed optimizer with the same ``k``.
        rho, adaptive, eta, centralize, norm_eps: SAM's per-group options
            (defaults 0.05, False, 0.01, False, 1e-12), used on SAM steps.
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    Cost: ``1 + 1/k`` forward-backward passes per step on average. Memory:
    one copy of the parameters during a SAM step (the saved ``w``), none on
    the other steps and none between steps.

    Example::

        opt = SAMEveryK(model.parameters(), torch.optim.SGD, k=5, rho=0.05, lr=0.1, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

    Reference:
        The "SAM every k steps" baseline of Liu, Mai, Chen, Hsieh, You.
        Towards Efficient and Scalable Sharpness-Aware Minimization (LookSAM).
        CVPR 2022, arXiv:2203.02714 (its ``alpha = 0`` special case).

    Departures: none; the SAM steps are those of :class:`flatminima.SAM`.
    """

    method_options = SAM.method_options + ("k",)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        k: int = 5,
        rho: float = 0.05,
        adaptive: bool = False,
        eta: float = 0.01,
        centralize: bool = False,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.k = V.positive_int("k", k)
        super().__init__(
            params,
            base_optimizer,
            rho=rho,
            adaptive=adaptive,
            eta=eta,
            centralize=centralize,
            norm_eps=norm_eps,
            max_grad_norm=max_grad_norm,
            foreach=foreach,
            model=model,
            **base_kwargs,
        )
        self.method_state["step"] = 0

    def _perturb_this_step(self, ctx: StepContext) -> bool:
        return self.method_state["step"] % self.k == 0

    def _post_step(self, ctx: StepContext) -> None:
        self.method_state["step"] += 1
