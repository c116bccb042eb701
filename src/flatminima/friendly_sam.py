"""FriendlySAM: perturb along the noise part of the gradient only."""

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

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        rho: neighbourhood radius (default 0.05; the paper's CIFAR-100
            script uses 0.2 with lam=0.6).
        sigma: how much of the average gradient ``m`` is removed, >= 0
            (default 1.0).
        lam: decay of the moving average ``m``, in ``[0, 1)`` (default 0.9).
        norm_eps: denominator offset ``eps0`` (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    Memory: one persistent copy of the parameters (``m``); during the step
    two more (the saved ``w`` and the new ``m``, which replaces the old one
    after the base step).

    Example::

        opt = FriendlySAM(model.parameters(), torch.optim.SGD, rho=0.2, sigma=1.0, lam=0.6, lr=0.05, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

    Reference:
        Li, Zhou, He, Cheng, Huang. Friendly Sharpness-Aware Minimization.
        CVPR 2024, arXiv:2403.12350. Official code: nblt/F-SAM.

    Departures: none in the update. The official code updates ``m`` inside
    its first step; here it is committed after the base step, so a step
    skipped for a non-finite gradient leaves ``m`` unchanged.
    """

    shard_state = ("m",)  # the new momentum, from this shard's gradient
    group_checks = {
        "rho": V.non_negative,
        "sigma": V.non_negative,
        "lam": partial(V.in_range, low=0.0, high=1.0, high_open=True),
        "norm_eps": V.positive,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        sigma: float = 1.0,
        lam: float = 0.9,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        defaults = dict(rho=rho, sigma=sigma, lam=lam, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        fe, lam, sigma = ctx.foreach, view.group["lam"], view.group["sigma"]
        old = [self.state.get(p, {}).get("m") for p in view.params]  # .get: no state is created here
        have = [i for i, m in enumerate(old) if m is not None]
        fresh = [i for i, m in enumerate(old) if m is None]
        # The new average, kept aside until the step is taken (not committed here).
        new: list[Tensor | None] = [None] * len(old)
        if have:
            updated = T.clone([old[i] for i in have], fe)
            T.axpby_(updated, lam, [view.grads[i] for i in have], 1.0 - lam, fe)
            for i, m in zip(have, updated):
                new[i] = m
        if fresh:
            for i, m in zip(fresh, T.clone([view.grads[i] for i in fresh], fe)):
                new[i] = m
        ctx.extra.setdefault("m", {}).update(zip(view.params, new))
        if not have or sigma == 0.0:
            return False
        T.add_([view.grads[i] for i in have], [old[i] for i in have], fe, alpha=-sigma)
        return True

    def _post_step(self, ctx: StepContext) -> None:
        if not ctx.perturbed:
            return
        new = ctx.extra["m"]
        for p, value in new.items():  # the parameters perturbed in this step
            self.state[p]["m"] = value
