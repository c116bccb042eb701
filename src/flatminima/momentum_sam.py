"""Momentum-SAM: perturb along the negative momentum, before the step's only pass (a pre-pass ascent)."""

from __future__ import annotations

import warnings
from typing import Any

import torch

from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._parts import Ascent

#: base optimizers whose state Momentum-SAM reads, and the key of the momentum there
BUFFERS: dict[type[torch.optim.Optimizer], str] = {
    torch.optim.SGD: "momentum_buffer",
    **dict.fromkeys((torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax), "exp_avg"),
}


def _key(base: torch.optim.Optimizer) -> str | None:
    """Where ``base`` (or the torch optimizer it subclasses) keeps its momentum."""
    return next((key for cls, key in BUFFERS.items() if isinstance(base, cls)), None)


class Momentum(Ascent):
    """``v = -m``, ``m`` the base optimizer's momentum, known before any pass."""

    name = "momentum"
    pre_pass = True

    def init(self, opt: Any) -> None:
        if _key(opt.base_optimizer) is None:
            raise ValueError(
                f"{type(opt).__name__} perturbs along the base optimizer's momentum and cannot read it from "
                f"{type(opt.base_optimizer).__name__}; use one of {', '.join(c.__name__ for c in BUFFERS)}"
            )

    def check_group(self, group: Any) -> None:
        if group.get("momentum", None) == 0 and "nesterov" in group:  # SGD without momentum keeps no buffer
            msg = "Momentum-SAM over SGD with momentum=0: SGD keeps no momentum buffer, so no step is ever "
            warnings.warn(msg + "perturbed and this is plain SGD; pass momentum=0.9, say, or use SAM", RuntimeWarning)

    def prepare(self, opt: Any, ctx: StepContext) -> bool:
        key = _key(opt.base_optimizer)
        ctx.groups = []
        for group in opt.param_groups:
            params = [p for p in group["params"] if opt.base_optimizer.state.get(p, {}).get(key) is not None]
            ctx.groups.append(GroupView(group, params, [torch.neg(opt.base_optimizer.state[p][key]) for p in params]))
        return any(v.params for v in ctx.groups)


class MomentumSAM(SharpnessAware):
    r"""Momentum-SAM: ``eps = -rho m / ||m||`` from the base optimizer's momentum ``m``, one pass per step.

    Each step, before any forward or backward::

        m   = momentum buffer of the base optimizer  # SGD: momentum_buffer (includes weight decay);
                                                     # Adam, AdamW, NAdam, RAdam, Adamax: exp_avg
        eps = -rho * m / (||m|| + eps0)              # no buffer yet (the first step): no perturbation
        g_p = grad L(w + eps)                        # the step's only forward and backward
        w   = Base(w, g_p)                           # w restored by copy first

    ``||m||`` is global over every group. A parameter without a buffer (no
    gradient so far) gets ``eps = 0``; on the first step nothing has a buffer,
    and the step is the base optimizer's at ``w``. ``rho = 0`` is the base
    optimizer bit for bit. Parts: ascent :class:`Momentum` (pre-pass),
    combine ``d = g_p``, every step (``flatminima.compose(ascent=["momentum",
    "asam"], ...)`` adds ASAM's operator). It cannot feed WSAM, GSAM,
    LookSAM's reuse or AE-SAM, which need the clean gradient at ``w``.

    **Order of calls.** ``step(closure)`` calls the closure once, at ``w +
    eps``, and returns that loss. With the explicit API, call
    :meth:`first_step` *before* the backward::

        opt.first_step(zero_grad=True)   # w <- w + eps (from the momentum), gradients cleared
        loss_fn(model(x), y).backward()  # the only pass, at w + eps
        opt.second_step()                # w restored, the base step on g_p

    The BatchNorm running statistics of that pass are kept (it is the only
    one). Under DDP ``eps`` is the same on every replica (the momentum is).

    Args:
        rho: neighbourhood radius (default 0.3, the official code's; the
            paper tunes it per task and uses larger values than SAM's).
        @shared_args@

    Cost: one forward-backward pass per step, as the base optimizer. Memory:
    one copy of the parameters during the step (``w + eps`` is built in a
    fresh buffer the parameters point at), none between steps.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.MomentumSAM(model.parameters(), torch.optim.SGD, rho=0.3, lr=0.1, momentum=0.9)
        >>> for _ in range(3):
        ...     loss = opt.step(closure(opt))
        >>> opt.step_count, opt.perturbed_steps   # no momentum at the first step
        (3, 2)

    Reference:
        Becker, Altrock, Risse. Momentum-SAM: Sharpness Aware Minimization
        without Computational Overhead. arXiv:2401.12033 (2024). Official
        code: MarlonBecker/MSAM (docs/algorithms.md#13-momentum-sam).

    Departures: the official optimizers keep the stored weights perturbed
    between steps and undo the perturbation by subtracting it (so a model
    evaluated or saved mid-training sees ``w + eps``, and ``w + eps - eps``
    drifts by rounding); here ``w`` is restored by copy within the step and
    is never perturbed between steps.
    """

    ascent = (Momentum(),)
    option_defaults = {"rho": 0.3}
