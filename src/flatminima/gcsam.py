"""Gradient centralisation of the ascent vector (GCSAM): an ascent part.

Per group, where ``centralize`` is on, each tensor with two or more dims
loses its mean over every dim but the first (one mean per output
channel)::

    v   <- GC(v)
    eps  = rho * GC(v) / (||GC(v)|| + eps0)     # the norm after centralising: ||eps|| = rho

pytorch_optimizer takes the norm before centralising (``||eps|| < rho``).
The descent gradient is not centralised. With ASAM on as well,
``v = T_w GC(g)``.

Reference: Hassan et al. GCSAM: Gradient Centralized Sharpness Aware
Minimization. arXiv:2501.11584 (docs/algorithms.md#3-gcsam).
``flatminima.create("gcsam", ...)`` is :class:`~flatminima.SAM` with
``centralize=True``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor

from . import _tensorops as T
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._parts import Ascent


class Centralize(Ascent):
    name = "centralize"
    shared = ("centralize",)

    def needs_whole_tensors(self, opt: SharpnessAware, group: Mapping[str, Any]) -> str | None:
        return "centralize=True takes a mean per output channel of each weight tensor" if group.get("centralize") else None

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if not view.group.get("centralize", False):
            return False
        T.centralize_(view.grads)
        return True
