"""WSAM: sharpness as a weighted regulariser of the loss (a combine)."""

from __future__ import annotations

from torch import Tensor

from . import _tensorops as T, _validate as V, _views as views
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._options import Option
from ._parts import Combine
from .asam import Adaptive


class Weighted(Combine):
    """``d = alpha g_p + (1 - alpha) g`` (coupled) or ``d = g`` and ``w -= lr alpha (g_p - g)`` after the step."""

    name = "wsam"
    options = {
        "gamma": Option(0.9, V.below_one, "weight of the sharpness term"),
        "decouple": Option(True, V.flag, "apply the sharpness term after the base step"),
    }
    needs_clean_grad = True

    alpha = staticmethod(lambda group: group["gamma"] / (1.0 - group["gamma"]))  # alpha = gamma / (1 - gamma)

    def wants(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        return any(self.alpha(v.group) != 0.0 for v in ctx.groups if v.params)

    def combine(self, opt: SharpnessAware, ctx: StepContext) -> None:
        ctx.extra["sharpness"] = [self._direction(v, ctx.foreach) for v in ctx.groups]

    def _direction(self, v: GroupView, fe: bool) -> list[Tensor] | None:
        """The group's direction in ``.grad``; returns the decoupled term ``s``."""
        alpha, clean, v.clean = self.alpha(v.group), v.clean or [], None
        if v.group["decouple"]:  # s = g_p - g in g_p's buffer; the base optimizer gets g itself
            T.add_(v.grads, clean, fe, alpha=-1.0)
            s = views.set_grads(v, clean)
            return s if alpha != 0.0 else None
        if alpha == 0.0:  # exact at alpha = 0 (the base step) and 1 (SAM)
            T.copy_(v.grads, clean, fe)
        elif alpha != 1.0:
            T.axpby_(v.grads, alpha, clean, 1.0 - alpha, fe)
        return None

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        terms = ctx.extra["sharpness"] if ctx.perturbed else []
        views.clip_lists(ctx, [s for s in terms if s is not None], opt.max_grad_norm)  # the same bound as d
        for v, s in zip(ctx.groups, terms):
            if s is not None:  # a plain SGD step with the group's current lr, not preconditioned
                T.add_scaled_(v.params, s, -self.alpha(v.group) * v.group["lr"], ctx.foreach)


class WSAM(SharpnessAware):
    r"""Weighted SAM: ``L + alpha * (L(w + eps) - L(w))`` with ``alpha = gamma / (1 - gamma)``.

    Each step, with ``g = grad L(w)`` from the clean pass::

        eps = rho * g / (||g|| + eps0)           # or ASAM's eps with adaptive=True
        g_p = grad L(w + eps)                    # perturbed pass
        alpha = gamma / (1 - gamma)
        # decouple=False (coupled):
        w   = Base(w, alpha * g_p + (1 - alpha) * g)
        # decouple=True (default):
        w   = Base(w, g)
        w   = w - lr * alpha * (g_p - g)         # lr: the group's current lr

    In decoupled mode the sharpness term ``s = g_p - g`` is a plain SGD step
    taken after the base step with the group's current ``lr`` (whatever LR
    scheduler drives it): it is not preconditioned by Adam & co. nor given
    momentum, as in the official code.

    When ``gamma == 0`` in every group the perturbed pass is skipped (the
    step is the base optimizer's step on ``g``): ``first_step`` returns
    False and ``step(closure)`` calls the closure once.

    Formulas, special cases and departures: docs/algorithms.md#4-wsam.

    Args:
        rho: neighbourhood radius (default 0.05).
        gamma: weight of the sharpness term, in ``[0, 1)`` (default 0.9).
        decouple: apply the sharpness term after the base step, outside the
            base optimizer (default True, as recommended by the paper).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None). In decoupled mode that is ``g``,
            and the sharpness term ``s`` is clipped to the same bound
            separately, so one step moves ``w`` by at most
            ``lr * (1 + alpha) * max_grad_norm`` with plain SGD.
        @shared_args@

    Memory: two copies of the parameters during the step (the saved ``w``
    and the clean gradient ``g``), none between steps. In decoupled mode
    ``s`` is computed in the perturbed gradient's buffer and ``.grad`` is
    re-bound to the copy of ``g``, so the base optimizer sees ``g`` exactly.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.WSAM(model.parameters(), torch.optim.SGD, rho=0.05, gamma=0.9, lr=0.1)
        >>> loss = opt.step(closure(opt))
        >>> opt.step_count
        1

    Reference:
        Yue, Jiang, Ye, Gao, Liu, Zhang. Sharpness-Aware Minimization
        Revisited: Weighted Sharpness as a Regularization Term. KDD 2023,
        arXiv:2305.15817. Official code: dlrover ``atorch/optimizers/wsam.py``.

    Departures: the official class clips ``g`` and ``g_p`` at
    ``max_norm=1.0`` by default and defaults to ``gamma=0.88``; here
    clipping is off unless asked and acts on the direction handed to the
    base optimizer, and ``gamma`` defaults to 0.9 (README, pytorch_optimizer).
    ``adaptive`` is the library-wide ASAM operator with ``eta`` (the
    official code uses the eta-free form: pass ``eta=0``).
    """
    ascent = (Adaptive(),)
    combine = Weighted()
