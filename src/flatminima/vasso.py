"""VaSSO: variance-suppressed sharpness-aware optimization (an ascent)."""

from __future__ import annotations


from torch import Tensor

from . import _tensorops as T, _validate as V
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._options import Option
from ._parts import Ascent


class Variance(Ascent):
    """``v = d = theta g + (1 - theta) d``, committed after a perturbed step."""

    name = "vasso"
    options = {"theta": Option(0.9, V.above_zero, "weight of g in d")}
    reads_gradient = True
    param_state = ("d",)
    shard_state = ("d",)  # the new average, from this shard's gradient

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        fe, theta = ctx.foreach, view.group["theta"]
        old = [opt.state.get(p, {}).get("d") for p in view.params]  # .get: no state is created here
        have = [i for i, d in enumerate(old) if d is not None]
        changed = bool(have) and theta != 1.0
        if changed:
            T.axpby_([view.grads[i] for i in have], theta, [old[i] for i in have], 1.0 - theta, fe)  # type: ignore[misc]
        # The new d, kept aside until the step is taken (not committed here).
        ctx.extra.setdefault("d", {}).update(zip(view.params, T.clone(view.grads, fe)))
        return changed

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        if ctx.perturbed:
            for p, value in ctx.extra["d"].items():  # the parameters perturbed in this step
                opt.state[p]["d"] = value


class VaSSO(SharpnessAware):
    r"""VaSSO: the perturbation follows a moving average ``d`` of the gradients.

    Each step, with ``g = grad L(w)`` from the clean pass::

        d   = theta * g + (1 - theta) * d        # first step (no d yet): d = g
        eps = rho * d / (||d|| + eps0)
        g_p = grad L(w + eps)                    # perturbed pass
        w   = Base(w, g_p)

    The new ``d`` is computed once, in the gradient buffer, and a copy of it
    is committed as the state after the base step (a skipped step leaves
    ``d`` untouched); it is saved in the state dict (``state[p]["d"]``).
    ``theta = 1`` is SAM (bit for bit).

    Formulas, special cases and departures: docs/algorithms.md#8-vasso.

    Args:
        rho: neighbourhood radius (default 0.05; the paper uses 0.2 for
            WRN-28-10 on CIFAR-100).
        theta: weight of the new gradient in ``d``, in ``(0, 1]`` (default 0.9).
        @shared_args@

    Memory: one persistent copy of the parameters (``d``); during the step
    two more (the saved ``w`` and the new ``d``, which replaces the old one
    after the base step).

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.VaSSO(model.parameters(), torch.optim.SGD, rho=0.2, theta=0.9, lr=0.1)
        >>> loss = opt.step(closure(opt))
        >>> opt.step_count
        1

    Reference:
        Li, Giannakis. Enhancing Sharpness-Aware Optimization Through
        Variance Suppression. NeurIPS 2023, arXiv:2309.15639. Official code:
        BingcongLi/VaSSO.

    Departures: the denominator offset defaults to 1e-12, the library-wide
    value (the official code uses 1e-7; pass ``norm_eps=1e-7`` for it). The
    official code updates ``d`` in place in its first step; here it is
    committed after the base step.
    """
    ascent = (Variance(),)
