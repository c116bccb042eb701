"""SAM, and its ASAM and GCSAM forms (flags of the same class)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from ._base import GroupView, SharpnessAware, StepContext


class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization, with ASAM and GCSAM as options.

    Each step, with ``g = grad L(w)`` from the clean pass::

        v   = g                                  # SAM
        v   = T_w * g,  T_w = |w| + eta          # adaptive=True (ASAM, elementwise)
        v   = GC(g)                              # centralize=True (GCSAM)
        eps = rho * v / (||v|| + eps0)           # SAM, GCSAM: ||eps|| = rho
        eps = rho * T_w * v / (||v|| + eps0)     # ASAM: ||T_w^-1 eps|| = rho
        g_p = grad L(w + eps)                    # perturbed pass
        w   = Base(w, g_p)                       # w restored by copy first

    ``||v||`` is global over every parameter of every group; ``rho``,
    ``adaptive``, ``eta``, ``centralize`` and ``norm_eps`` are per-group, so a
    group built with ``adaptive=False`` uses ``T = I`` inside a global ASAM
    norm — the official ASAM scope, one line with
    :func:`flatminima.split_param_groups`. ``GC`` subtracts from each tensor
    with >= 2 dims its mean over every dim but the first; the norm is taken
    after centralising, so ``||eps|| = rho`` (pytorch_optimizer takes it
    before, giving ``||eps|| < rho``). With both flags, ``v = T_w GC(g)``.

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class, built over our
            param groups with ``**base_kwargs``, or an instance already built
            over the same parameters.
        rho: neighbourhood radius (default 0.05; recommended 0.5 for ASAM
            with eta=0.01, 2.0 for eta-free ASAM).
        adaptive: use ASAM's operator ``T_w = |w| + eta`` (default False).
        eta: ASAM's offset (default 0.01; ``eta=0`` is the popular eta-free
            form ``rho * w^2 g / || |w| g ||``).
        centralize: centralise the ascent gradient (GCSAM, default False).
        norm_eps: denominator offset ``eps0`` (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None: no clipping).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass. Under DDP give the
            ``DistributedDataParallel`` module: each replica then perturbs
            with its own gradient (the clean pass runs under ``no_sync``);
            ``sync_perturbations=True`` (accepted by every method) averages
            the clean gradient too, for one global ``eps``
            (docs/training.md).
        **base_kwargs: the base optimizer's arguments (``lr``, ``momentum``...).

    ``step(closure, scaler=..., chunks=...)`` takes a GradScaler for fp16
    and gives m-sharpness on one device (:meth:`SharpnessAware.step`).

    Weight decay is not part of ``eps``: the base optimizer applies it, as
    PyTorch optimizers do (official SAM puts an L2 term in the loss; add one
    to your loss for that behaviour).

    Memory: one copy of the parameters during the step (``w + eps`` is
    built in the clean gradient's buffer, which the parameters point at
    during the perturbed pass; ASAM's ``T_w`` takes a scratch buffer before
    that), none between steps.

    Example::

        opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021, arXiv:2010.01412.
        Kwon, Kim, Park, Choi. ASAM: Adaptive Sharpness-Aware Minimization
        for Scale-Invariant Learning of Deep Neural Networks. ICML 2021,
        arXiv:2102.11600.
        Hassan et al. GCSAM: Gradient Centralized Sharpness Aware
        Minimization. arXiv:2501.11584.

    Departures: the official ASAM normalises only parameters whose name
    contains "weight"; here ``adaptive`` applies to whole groups (see
    :func:`flatminima.split_param_groups` for the official scope).
    """

    group_checks = {
        "rho": V.non_negative,
        "adaptive": V.flag,
        "eta": V.non_negative,
        "centralize": V.flag,
        "norm_eps": V.positive,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
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
        defaults = dict(rho=rho, adaptive=adaptive, eta=eta, centralize=centralize, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        return ascent_vector(ctx, view, scratch)

    def _ascent_finish(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        ascent_finish(ctx, view, scratch)


def ascent_vector(ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
    """The ``centralize``/``adaptive`` ascent of :class:`SAM`, for reuse by
    methods that share its neighbourhood (``adaptive`` means the same ASAM
    operator in every method). Leaves ``T_w`` in ``scratch``."""
    group, changed = view.group, False
    if group.get("centralize", False):
        T.centralize_(view.grads)
        changed = True
    if group.get("adaptive", False):
        T.abs_plus_(scratch, view.params, group["eta"], ctx.foreach)
        T.mul_elementwise_(view.grads, scratch, ctx.foreach)
        changed = True
    return changed


def ascent_finish(ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
    """ASAM's second ``T_w``: ``eps`` direction ``T_w v`` (``T_w`` is in ``scratch``)."""
    if view.group.get("adaptive", False):
        T.mul_elementwise_(view.grads, scratch, ctx.foreach)
