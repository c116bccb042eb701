"""Fisher SAM: the neighbourhood is a ball of the (diagonal) Fisher metric (an ascent)."""

from __future__ import annotations

from torch import Tensor

from . import _tensorops as T, _validate as V
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._options import Option
from ._parts import Ascent


class Fisher(Ascent):
    """``v = g / sqrt(f)``, finished to ``g / f``, with ``f = 1 + eta g^2``."""

    name = "fisher"
    options = {"eta": Option(1.0, V.non_negative, "weight of g^2 in the diagonal Fisher")}
    reads_gradient = True

    def needs_scratch(self, view: GroupView) -> bool:
        return True  # sqrt(1 + eta g^2)

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if view.group["eta"] == 0.0:  # f = 1: SAM
            return False
        T.sqrt_one_plus_sq_(scratch, view.grads, view.group["eta"], ctx.foreach)
        T.div_elementwise_(view.grads, scratch, ctx.foreach)
        return True

    def finish(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        if view.group["eta"] != 0.0:
            T.div_elementwise_(view.grads, scratch, ctx.foreach)


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

    Formulas, special cases and departures: docs/algorithms.md#6-fisher-sam.

    Args:
        rho: radius ``gamma`` of the Fisher ball (default 0.1).
        eta: weight of ``g^2`` in the diagonal Fisher (default 1.0).
        @shared_args@

    Memory: one copy of the parameters during the step (``sqrt(f)`` lives in
    the scratch buffer that then holds the saved ``w``), none between steps.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.FisherSAM(model.parameters(), torch.optim.SGD, rho=0.1, eta=1.0, lr=0.1)
        >>> loss = opt.step(closure(opt))
        >>> opt.step_count
        1

    Reference:
        Kim, Li, Hu, Hospedales. Fisher SAM: Information Geometry and
        Sharpness Aware Minimisation. ICML 2022, arXiv:2206.04920.

    Departures: no official code exists; this follows the paper's
    ``sqrt(g^T F^-1 g)`` normalisation (one third-party version instead
    rescales ``F^-1 g`` to Euclidean norm ``rho``, a different radius).
    The exact (rho, eta) grid of the paper was not verified.
    """
    ascent = (Fisher(),)
    option_defaults = {"rho": 0.1}
