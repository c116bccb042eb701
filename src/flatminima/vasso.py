"""VaSSO: variance-suppressed sharpness-aware optimization."""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from ._base import GroupView, SharpnessAware, StepContext


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

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        rho: neighbourhood radius (default 0.05; the paper uses 0.2 for
            WRN-28-10 on CIFAR-100).
        theta: weight of the new gradient in ``d``, in ``(0, 1]`` (default 0.9).
        norm_eps: denominator offset ``eps0`` (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    Memory: one persistent copy of the parameters (``d``); during the step
    two more (the saved ``w`` and the new ``d``, which replaces the old one
    after the base step).

    Example::

        opt = VaSSO(model.parameters(), torch.optim.SGD, rho=0.2, theta=0.9, lr=0.1, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

    Reference:
        Li, Giannakis. Enhancing Sharpness-Aware Optimization Through
        Variance Suppression. NeurIPS 2023, arXiv:2309.15639. Official code:
        BingcongLi/VaSSO.

    Departures: the denominator offset defaults to 1e-12, the library-wide
    value (the official code uses 1e-7; pass ``norm_eps=1e-7`` for it). The
    official code updates ``d`` in place in its first step; here it is
    committed after the base step.
    """

    shard_state = ("d",)  # the new average, from this shard's gradient
    group_checks = {
        "rho": V.non_negative,
        "theta": partial(V.in_range, low=0.0, high=1.0, low_open=True),
        "norm_eps": V.positive,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        theta: float = 0.9,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, theta=theta, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        fe, theta = ctx.foreach, view.group["theta"]
        old = [self.state.get(p, {}).get("d") for p in view.params]  # .get: no state is created here
        have = [i for i, d in enumerate(old) if d is not None]
        changed = bool(have) and theta != 1.0
        if changed:
            T.axpby_([view.grads[i] for i in have], theta, [old[i] for i in have], 1.0 - theta, fe)
        # The new d, kept aside until the step is taken (not committed here).
        ctx.extra.setdefault("d", {}).update(zip(view.params, T.clone(view.grads, fe)))
        return changed

    def _post_step(self, ctx: StepContext) -> None:
        if not ctx.perturbed:
            return
        new = ctx.extra["d"]
        for p, value in new.items():  # the parameters perturbed in this step
            self.state[p]["d"] = value
