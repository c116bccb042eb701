"""SAM every k steps: the base optimizer in between."""

from __future__ import annotations

from . import _validate as V
from ._base import SharpnessAware
from ._context import StepContext
from ._options import Option
from ._parts import Schedule
from .sam import SAM


class EveryK(Schedule):
    """A perturbed pass when ``t % k == 0`` (``t``: steps taken)."""

    name = "every_k"
    options = {"k": Option(5, V.positive_int, "period of the perturbed steps, an int >= 1", wide=True)}
    counts_steps = True

    def decide(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        return bool(opt.method_state["step"] % opt.k == 0)  # type: ignore[attr-defined]


class SAMEveryK(SAM):
    r"""SAM on every ``k``-th step, the plain base optimizer on the others.

    With ``t`` the number of steps taken so far (0 at the first step) and
    ``g = grad L(w)`` from the clean pass::

        t % k == 0:  eps = rho * v / (||v|| + eps0)   # SAM's eps (v as in SAM:
                     g_p = grad L(w + eps)            # g, T_w g, GC(g))
                     w   = Base(w, g_p)
        otherwise:   w   = Base(w, g)                 # one pass, no perturbation

    On the other steps ``first_step`` returns False and ``step(closure)``
    calls the closure once. ``t`` counts steps taken (a skipped step does
    not count, so it is retried at the same ``t``); it lives in
    ``method_state["step"]`` and ``k`` in the state dict's options, so a
    run resumed in the middle of a period continues bit for bit. ``k = 1``
    is SAM bit for bit; it is LookSAM with ``alpha = 0``. Parts: SAM's
    ascent and combine, schedule :class:`EveryK`
    (docs/algorithms.md#11-sam-every-k).

    Args:
        k: period of the SAM steps, an int >= 1 (default 5), one value for
            the whole optimizer.
        rho: neighbourhood radius, used on SAM steps (default 0.05).
        @shared_args@

    Cost: ``1 + 1/k`` forward-backward passes per step on average. Memory:
    one copy of the parameters during a SAM step, none otherwise.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.SAMEveryK(model.parameters(), torch.optim.SGD, k=2, rho=0.05, lr=0.1)
        >>> for _ in range(4):
        ...     loss = opt.step(closure(opt))
        >>> opt.perturbed_steps
        2

    Reference:
        The "SAM every k steps" baseline of Liu, Mai, Chen, Hsieh, You.
        Towards Efficient and Scalable Sharpness-Aware Minimization (LookSAM).
        CVPR 2022, arXiv:2203.02714 (its ``alpha = 0`` special case).

    Departures: none; the SAM steps are those of :class:`flatminima.SAM`.
    """

    schedule = EveryK()
