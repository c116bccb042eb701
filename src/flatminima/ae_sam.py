"""AE-SAM: a SAM step only where the gradient norm is large for the current phase of training."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _validate as V
from ._base import StepContext, total
from .sam import SAM


def initial_threshold(sam_fraction: float) -> float:
    """``c_0 = Phi^-1(1 - r)``: the threshold that a normally distributed
    ``||g||^2`` exceeds with probability ``r`` (0 for ``r`` in {0, 1}, where
    the decision does not use it)."""
    if sam_fraction <= 0.0 or sam_fraction >= 1.0:
        return 0.0
    return statistics.NormalDist().inv_cdf(1.0 - sam_fraction)


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

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        sam_fraction: target fraction ``r`` of SAM steps, in ``[0, 1]``
            (default 0.5, the paper's operating point).
        decay: decay ``delta`` of the moving averages, in ``[0, 1)``
            (default 0.9).
        gain: step of the threshold controller, > 0 (default 0.05). Larger
            tracks ``r`` faster and lets ``c`` jitter more.
        rho, adaptive, eta, centralize, norm_eps: SAM's per-group options
            (defaults 0.05, False, 0.01, False, 1e-12), used on SAM steps.
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    ``sam_fraction``, ``decay`` and ``gain`` are one value for the whole
    optimizer and not part of the state dict (build a resumed optimizer
    with the same values).

    Cost: ``1 + r`` forward-backward passes per step on average. Memory: one
    copy of the parameters during a SAM step (the saved ``w``), none
    between steps.

    Example::

        opt = AESAM(model.parameters(), torch.optim.SGD, rho=0.05, sam_fraction=0.5, lr=0.1, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss
        print(opt.perturbed_steps / opt.step_count)   # -> about 0.5

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

    decides_from_gradient = True  # ||g||^2 against its running statistics
    method_options = SAM.method_options + ("sam_fraction", "decay", "gain")

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        sam_fraction: float = 0.5,
        decay: float = 0.9,
        gain: float = 0.05,
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
        self.sam_fraction = V.in_range("sam_fraction", sam_fraction, 0.0, 1.0)
        self.decay = partial(V.in_range, low=0.0, high=1.0, high_open=True)("decay", decay)
        self.gain = V.positive("gain", gain)
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
        self.method_state.update(step=0, mu=0.0, var=0.0, c=initial_threshold(self.sam_fraction))

    @property
    def threshold(self) -> float:
        """The current ``c_t``."""
        return self.method_state["c"]

    def _perturb_this_step(self, ctx: StepContext) -> bool:
        state, decay = self.method_state, self.decay
        x = float(total(ctx.grad_sq))
        if state["step"] == 0:
            mu, var = x, 0.0
        else:
            mu = decay * state["mu"] + (1.0 - decay) * x
            var = decay * state["var"] + (1.0 - decay) * (x - mu) ** 2
        r = self.sam_fraction
        if r >= 1.0:
            sam = True
        elif r <= 0.0:
            sam = False
        else:
            sam = x >= mu + state["c"] * math.sqrt(var)
        ctx.extra["ae_sam"] = (mu, var, sam)  # committed after the base step
        return sam

    def _post_step(self, ctx: StepContext) -> None:
        mu, var, sam = ctx.extra["ae_sam"]
        state = self.method_state
        state["mu"], state["var"] = mu, var
        state["c"] = state["c"] + self.gain * (float(sam) - self.sam_fraction)
        state["step"] += 1
