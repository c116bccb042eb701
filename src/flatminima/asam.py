"""ASAM's operator ``T_w = |w| + eta``: an ascent part (ALGORITHMS: docs/algorithms.md#2-asam).

Per group, where ``adaptive`` is on::

    v   <- T_w * v                          # before the global norm
    eps  = rho * T_w * v / (||v|| + eps0)   # so ||T_w^-1 eps|| = rho

``eta = 0`` is the popular eta-free form ``rho * w^2 g / || |w| g ||``.
The flag is per group, so a group with ``adaptive=False`` uses ``T = I``
inside the global ASAM norm (the official "weights only" scope is one line
with :func:`flatminima.split_param_groups`). Memory: ``T_w`` takes one
parameter-sized scratch buffer during the ascent.

Reference: Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware
Minimization for Scale-Invariant Learning of Deep Neural Networks. ICML
2021, arXiv:2102.11600. ``flatminima.create("asam", ...)`` is
:class:`~flatminima.SAM` with ``adaptive=True, rho=0.5``.
"""

from __future__ import annotations

from torch import Tensor

from . import _tensorops as T
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._parts import Ascent


class Adaptive(Ascent):
    name = "asam"
    shared = ("adaptive", "eta")

    def needs_scratch(self, view: GroupView) -> bool:
        return bool(view.group.get("adaptive", False))

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if not view.group.get("adaptive", False):
            return False
        T.abs_plus_(scratch, view.params, view.group["eta"], ctx.foreach)  # T_w, kept for finish
        T.mul_elementwise_(view.grads, scratch, ctx.foreach)
        return True

    def finish(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        if view.group.get("adaptive", False):
            T.mul_elementwise_(view.grads, scratch, ctx.foreach)
