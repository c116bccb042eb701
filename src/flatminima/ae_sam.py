"""AE-SAM: a SAM step only where the gradient norm is large for the current phase of training."""

from __future__ import annotations

import math
from statistics import NormalDist
from . import _validate as V
from ._base import SharpnessAware
from ._context import StepContext, total
from ._options import Option
from ._parts import Schedule
from .sam import SAM


def initial_threshold(sam_fraction: float) -> float:
    """``c_0 = Phi^-1(1 - r)``: the threshold that a normally distributed
    ``||g||^2`` exceeds with probability ``r`` (0 for ``r`` in {0, 1})."""
    return 0.0 if sam_fraction <= 0.0 or sam_fraction >= 1.0 else NormalDist().inv_cdf(1.0 - sam_fraction)


class AdaptivePolicy(Schedule):
    """SAM when ``||g||^2 >= mu + c sqrt(var)`` (EMAs), ``c`` steered to a fraction ``r``."""

    name = "ae_sam"
    options = {
        "sam_fraction": Option(0.5, V.fraction, "target fraction r of SAM steps", wide=True),
        "decay": Option(0.9, V.below_one, "decay of the EMAs", wide=True),
        "gain": Option(0.05, V.positive, "step of the threshold controller", wide=True),
    }
    reads_gradient = True  # ||g||^2 against its running statistics
    counts_steps = True

    def init(self, opt: SharpnessAware) -> None:
        opt.method_state.update(mu=0.0, var=0.0, c=initial_threshold(opt.sam_fraction))  # type: ignore[attr-defined]

    def decide(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        state, decay, r = opt.method_state, opt.decay, opt.sam_fraction  # type: ignore[attr-defined]
        x = float(total(ctx.grad_sq))
        first = state["step"] == 0  # the averages start at x_1
        mu = x if first else decay * state["mu"] + (1.0 - decay) * x
        var = 0.0 if first else decay * state["var"] + (1.0 - decay) * (x - mu) ** 2
        sam = True if r >= 1.0 else False if r <= 0.0 else x >= mu + state["c"] * math.sqrt(var)
        ctx.extra["ae_sam"] = (mu, var, sam)  # committed after the base step
        return sam

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        mu, var, sam = ctx.extra["ae_sam"]
        c = opt.method_state["c"] + opt.gain * (float(sam) - opt.sam_fraction)  # type: ignore[attr-defined]
        opt.method_state.update(mu=mu, var=var, c=c)


class AESAM(SAM):
    r"""AE-SAM: SAM when ``||g||^2`` is large against its recent history, the base optimizer otherwise.

    With ``x_t = ||g_t||^2`` from the clean pass (global over every group)::

        mu_t    = decay * mu_{t-1}    + (1 - decay) * x_t            # first step: mu = x
        var_t   = decay * var_{t-1}   + (1 - decay) * (x_t - mu_t)^2 # first step: var = 0
        s_t     = x_t >= mu_t + c_t * sqrt(var_t)                    # SAM step?
        s_t:      eps = rho * v / (||v|| + eps0);  w = Base(w, grad L(w + eps))   # as SAM
        not s_t:  w = Base(w, g)                                    # one pass
        c_{t+1} = c_t + gain * (s_t - r)                             # c_0 = Phi^-1(1 - r)

    ``r = sam_fraction`` is the fraction of SAM steps to aim at. The
    threshold ``c`` is an integral controller: it rises after a SAM step and
    falls after a base step, so over ``T`` steps the fraction of SAM steps
    is exactly ``r + (c_T - c_0) / (gain * T)`` — it tends to ``r`` as long
    as ``c`` stays bounded, which it does whenever ``||g||^2`` is not
    constant (a large ``c`` stops SAM steps and brings ``c`` down, and
    conversely). ``c_0`` is the normal quantile that gives ``r`` when
    ``||g||^2`` is normally distributed, as the paper assumes, so the
    controller starts close. Which steps get SAM stays adaptive: those
    whose gradient norm is large for the current phase of training.

    For ``r > 0`` the first step is a SAM step (``var = 0``). ``r = 1`` is SAM and
    ``r = 0`` the base optimizer, bit for bit. ``mu``, ``var``, ``c`` and the
    step count live in ``method_state`` (Python floats, saved by
    ``state_dict()``) and are committed after the base step, on both kinds
    of step; a step skipped for a non-finite gradient changes none of them.
    On base steps ``first_step`` returns False and ``step(closure)`` calls
    the closure once. Reading ``||g||^2`` costs no extra device
    synchronisation (the non-finite check already has one).

    Formulas, special cases and departures: docs/algorithms.md#12-ae-sam.

    Args:
        sam_fraction: target fraction ``r`` of SAM steps, in ``[0, 1]``
            (default 0.5, the paper's operating point).
        decay: decay ``delta`` of the moving averages, in ``[0, 1)``
            (default 0.9).
        gain: step of the threshold controller, > 0 (default 0.05). Larger
            tracks ``r`` faster and lets ``c`` jitter more.
        rho: neighbourhood radius, used on SAM steps (default 0.05).
        @shared_args@

    ``sam_fraction``, ``decay`` and ``gain`` are one value for the whole
    optimizer, saved with the state dict's options.

    Cost: ``1 + r`` forward-backward passes per step on average. Memory: one
    copy of the parameters during a SAM step (the saved ``w``), none
    between steps.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.AESAM(model.parameters(), torch.optim.SGD, rho=0.05, sam_fraction=0.5, lr=0.1)
        >>> loss = opt.step(closure(opt))
        >>> opt.perturbed_steps   # the first step is a SAM step (var = 0)
        1

    Reference:
        Jiang, Yang, Zhang, Kwok. An Adaptive Policy to Employ
        Sharpness-Aware Minimization. ICLR 2023, arXiv:2304.14647.

    Departures: the paper schedules ``c_t`` linearly between two constants
    ``lambda_1``, ``lambda_2`` over the ``T`` steps of training, tuned so that
    about half the steps are SAM steps. An optimizer does not know ``T``,
    and the quantity users choose is the fraction, so here ``c_t`` is
    driven by the controller above towards ``r`` (to reproduce a fixed
    schedule, set ``gain`` small and move ``opt.method_state["c"]``
    yourself). The first step initialises the averages with ``x_1``.
    """
    schedule = AdaptivePolicy()

    @property
    def threshold(self) -> float:
        """The current ``c_t``."""
        return float(self.method_state["c"])
