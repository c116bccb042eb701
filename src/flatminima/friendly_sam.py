"""FriendlySAM: perturb along the noise part of the gradient only (an ascent)."""

from __future__ import annotations


from torch import Tensor

from . import _tensorops as T, _validate as V
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._options import Option
from ._parts import Ascent


class Friendly(Ascent):
    """``v = g - sigma m``; ``m = lam m + (1 - lam) g`` committed after a perturbed step."""

    name = "friendly"
    options = {
        "sigma": Option(1.0, V.non_negative, "how much of the average gradient m is removed"),
        "lam": Option(0.9, V.below_one, "decay of m"),
    }
    reads_gradient = True
    param_state = ("m",)
    shard_state = ("m",)  # the new average, from this shard's gradient

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        fe, lam, sigma = ctx.foreach, view.group["lam"], view.group["sigma"]
        old = [opt.state.get(p, {}).get("m") for p in view.params]  # .get: no state is created here
        have = [i for i, m in enumerate(old) if m is not None]
        new: list[Tensor | None] = [None] * len(old)  # kept aside until the step is taken
        if have:
            updated = T.clone([old[i] for i in have], fe)  # type: ignore[misc]
            T.axpby_(updated, lam, [view.grads[i] for i in have], 1.0 - lam, fe)
            for i, m in zip(have, updated):
                new[i] = m
        fresh = [i for i, m in enumerate(old) if m is None]
        for i, m in zip(fresh, T.clone([view.grads[i] for i in fresh], fe)):
            new[i] = m
        ctx.extra.setdefault("m", {}).update(zip(view.params, new))
        if not have or sigma == 0.0:
            return False
        T.add_([view.grads[i] for i in have], [old[i] for i in have], fe, alpha=-sigma)  # type: ignore[misc]
        return True

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        if ctx.perturbed:
            for p, value in ctx.extra["m"].items():  # the parameters perturbed in this step
                opt.state[p]["m"] = value


class FriendlySAM(SharpnessAware):
    r"""FriendlySAM: ``eps`` from ``g - sigma * m``, ``m`` an EMA of past gradients.

    Each step, with ``g = grad L(w)`` from the clean pass and ``m`` the
    per-parameter moving average of clean gradients::

        v   = g - sigma * m                      # first step (no m yet): v = g
        eps = rho * v / (||v|| + eps0)
        g_p = grad L(w + eps)                    # perturbed pass
        w   = Base(w, g_p)
        m   = lam * m + (1 - lam) * g            # first step: m = g

    ``m`` is committed after the base step (a skipped step leaves it
    untouched) and saved in the state dict (``state[p]["m"]``).
    ``sigma = 0`` is SAM (bit for bit).

    Formulas, special cases and departures: docs/algorithms.md#7-friendlysam.

    Args:
        rho: neighbourhood radius (default 0.05; the paper's CIFAR-100
            script uses 0.2 with lam=0.6).
        sigma: how much of the average gradient ``m`` is removed, >= 0
            (default 1.0).
        lam: decay of the moving average ``m``, in ``[0, 1)`` (default 0.9).
        @shared_args@

    Memory: one persistent copy of the parameters (``m``); during the step
    two more (the saved ``w`` and the new ``m``, which replaces the old one
    after the base step).

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lam=0.6, lr=0.05)
        >>> loss = opt.step(closure(opt))
        >>> opt.step_count
        1

    Reference:
        Li, Zhou, He, Cheng, Huang. Friendly Sharpness-Aware Minimization.
        CVPR 2024, arXiv:2403.12350. Official code: nblt/F-SAM.

    Departures: none in the update. The official code updates ``m`` inside
    its first step; here it is committed after the base step, so a step
    skipped for a non-finite gradient leaves ``m`` unchanged.
    """
    ascent = (Friendly(),)
