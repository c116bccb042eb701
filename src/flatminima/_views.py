"""The parameters a step works on, and how ``w`` comes back: per-group views.

A step sees each param group through a :class:`~flatminima._context.GroupView`
of the parameters that have a gradient. These helpers build the views from
``.grad``, re-read them after a pass, put the weights back after the
perturbed pass (re-pointed at their own storage, or copied: never
``w + eps - eps``) and clip the final direction.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _tensorops as T
from ._context import GroupView, StepContext, total
from ._sharding import squares


def check_dense(grad: Tensor, owner: str) -> None:
    if grad.is_sparse:
        raise TypeError(f"{owner} does not support sparse gradients")


def collect(param_groups: list[dict[str, Any]], owner: str) -> list[GroupView]:
    """One view per group, of the parameters with a gradient in ``.grad``."""
    views = []
    for group in param_groups:
        params = [p for p in group["params"] if p.grad is not None]
        grads = [g for p in params if (g := p.grad) is not None]
        for g in grads:
            check_dense(g, owner)
        views.append(GroupView(group, params, grads))
    return views


def use_foreach(foreach: bool | None, groups: list[GroupView]) -> bool:
    if foreach is not None:
        return foreach
    # torch._foreach_* kernels need plain dense tensors (not DTensor & co).
    return all(type(p) in (Tensor, torch.nn.Parameter) for v in groups for p in v.params)


def scratch(needs: Sequence[bool], view: GroupView, swap: bool) -> list[list[Tensor]]:
    """One parameter-sized buffer per ascent part that ``needs`` one; on the
    copy path the first one also holds the saved ``w``."""
    need = list(needs)
    if not swap and not any(need):
        need[0] = True  # the copy of w
    return [[torch.empty_like(p, memory_format=torch.preserve_format) for p in view.params] if n else [] for n in need]


def step_out(view: GroupView, coef: Any, swap: bool, scratch: list[list[Tensor]], foreach: bool) -> None:
    """``w <- w + coef * v`` (``v`` in ``view.grads``), keeping what brings ``w`` back.

    Fast path (``swap``: foreach, tensors that own their storage): ``w + eps``
    is written into the gradient's own buffer and the parameter points at it
    (``p.data``) until :func:`restore` points it back at its own, untouched
    storage: no copy of ``w``. Otherwise ``w`` is copied into a scratch buffer
    and ``eps`` added in place. On the host the factor is read once and
    folded into the add; on a device it stays a tensor (no sync).
    """
    on_host = not isinstance(coef, Tensor) or coef.device.type == "cpu"
    if on_host:
        coef = float(coef)
    else:
        T.mul_(view.grads, coef, foreach)  # eps, without a device sync
        coef = 1.0
    if swap:
        if on_host:
            T.add_into_(view.grads, view.params, coef)  # w + eps in the gradient's buffer
        else:
            T.add_(view.grads, view.params, foreach)
        view.saved = [p.data for p in view.params]
        for p, buf in zip(view.params, view.grads):
            p.grad = None  # a zero_grad(set_to_none=False) must not zero the weights
            p.data = buf
        view.swapped = True
    else:
        saved = next((buf for buf in scratch if buf), scratch[0])
        T.copy_(saved, view.params, foreach)
        T.add_(view.params, view.grads, foreach, alpha=coef)
        view.saved = saved
    # eps now lives in w: drop our references so that the closure's
    # zero_grad() frees these buffers before the perturbed backward.
    view.grads = []


def restore(ctx: StepContext) -> None:
    """``w`` back, exactly: re-pointed at its own storage, untouched since the
    clean pass, or copied from the saved values."""
    for v in ctx.groups:
        if v.saved is None:
            continue
        if v.swapped:
            for p, own in zip(v.params, v.saved):
                p.data = own
            v.swapped = False
        else:
            T.copy_(v.params, v.saved, ctx.foreach)
        v.saved = None  # free the copy (or the w + eps buffer) now


def set_aside(ctx: StepContext, param_groups: list[dict[str, Any]]) -> None:
    """Take every gradient out of ``.grad`` (``p.grad = None``) into ``ctx.aside``.

    A step without a perturbed pass uses the clean gradient, but the popular
    snippet runs its second backward whatever first_step() said: into an
    untouched ``.grad`` that backward would add ``g`` again and hand the base
    optimizer ``2 g``. Held aside, the tensors are out of its reach, and no
    copy is made."""
    ctx.aside = [(p, g) for group in param_groups for p in group["params"] if (g := p.grad) is not None]
    for p, _ in ctx.aside:
        p.grad = None


def no_clean_grad(owner: str) -> ValueError:
    """The error of a first_step() that finds no gradient to climb along."""
    return ValueError(
        f"{owner}.first_step() found no gradient in .grad: the clean backward is missing. Run "
        "loss.backward() (inside opt.clean_pass()) before first_step(), or use step(closure)"
    )


def put_back(ctx: StepContext, param_groups: list[dict[str, Any]]) -> None:
    """``.grad`` exactly as :func:`set_aside` found it: what a pass wrote since
    (the snippet's second backward, at the same ``w``) is dropped. Nothing
    set aside (a perturbed step): nothing to do."""
    if ctx.aside is None:
        return
    for group in param_groups:
        for p in group["params"]:
            p.grad = None
    for p, g in ctx.aside:
        p.grad = g
    ctx.aside = None


def reread_pre_pass(ctx: StepContext, param_groups: list[dict[str, Any]], owner: str) -> None:
    """The views of a pre-pass step without ``eps`` (Momentum-SAM's first step): its one pass ran
    at ``w`` after first_step() (its own order) or before it (the snippet's order: then what
    first_step() set aside comes back)."""
    if not any(p.grad is not None for group in param_groups for p in group["params"]):
        put_back(ctx, param_groups)
    ctx.aside = None
    refresh(ctx, param_groups, owner)
    if not any(v.params for v in ctx.groups):
        raise ValueError(f"{owner}: no gradient in .grad; call first_step() before the backward")


def refresh(ctx: StepContext, param_groups: list[dict[str, Any]], owner: str) -> None:
    """Point the views at the gradients now in ``.grad``: a parameter with a
    gradient only in the perturbed pass joins (its kept clean gradient is
    zero, as its eps was), one that lost its gradient drops out."""
    if not ctx.groups:  # a pre-pass step that did not perturb
        ctx.groups = [GroupView(g, [], []) for g in param_groups]
    for v in ctx.groups:
        clean = None if v.clean is None else dict(zip(map(id, v.params), v.clean))
        v.params = [p for p in v.group["params"] if p.grad is not None]
        v.grads = [g for p in v.params if (g := p.grad) is not None]
        for g in v.grads:
            check_dense(g, owner)
        if clean is not None:
            v.clean = [clean[id(p)] if id(p) in clean else torch.zeros_like(p) for p in v.params]


def clip(ctx: StepContext, max_norm: float | None) -> None:
    """Scale the direction in ``.grad`` to a global norm of at most ``max_norm``."""
    clip_lists(ctx, [v.grads for v in ctx.groups], max_norm)


def clip_lists(ctx: StepContext, lists: list[list[Tensor]], max_norm: float | None) -> None:
    """Scale the tensors of ``lists`` together to a global norm of at most ``max_norm``
    (over every shard: ``squares`` sums the ranks' parts under FSDP)."""
    if max_norm is None or not lists:
        return
    coef = torch.clamp(max_norm / (total(squares(ctx, lists)).sqrt() + 1e-6), max=1.0)
    for ts in lists:
        T.mul_(ts, coef, ctx.foreach)


def set_grads(view: GroupView, grads: list[Tensor]) -> list[Tensor]:
    """Point ``.grad`` of the view's parameters (and the view) at ``grads``;
    returns the tensors they held."""
    for p, g in zip(view.params, grads):
        p.grad = g
    held, view.grads = view.grads, grads
    return held


def release_clean(ctx: StepContext) -> None:
    """Drop the kept clean gradients (a combine that has used them)."""
    for v in ctx.groups:
        v.clean = None
