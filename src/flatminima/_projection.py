"""LookSAM's projection and reuse: the part ``g_v`` of ``g_s`` orthogonal to ``g``, added back between SAM steps.

``g_v = g_s - <g, g_s> / ||g||^2 * g`` (``g_s`` where ``g = 0``), globally or
per tensor. Inner products and norms accumulate in float32 at least; the
subtraction runs in the tensors' dtype, except below float32 (bf16, fp16):
there each tensor is computed in float32 and rounded once, to ``g_v``
itself. In bf16 the product ``c g`` alone would be rounded by
``eps_bf16 |g_s|``, noise of the size of a real ``g_v`` (3% of ``g_s`` is
common at small ``rho``), which the reuse step scales up to ``alpha ||g||``.
A ``g_v`` at the rounding level of the precision it was computed in,
``||g_v|| <= 4 eps_work ||g_s||`` (``eps_work``: float32's for bf16, fp16 and
float32, float64's for float64), is noise of the subtraction (a 1-element
tensor's orthogonal part is exactly 0) and is set to 0.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from . import _sharding as S
from . import _tensorops as T
from ._context import StepContext, total


def host_floats(values: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats, with one device synchronisation."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([x.to(device=device, dtype=torch.float64) for x in values]).tolist()


def _ratio(inner: Tensor, g_sq: Tensor) -> Tensor:
    """``<g, g_s> / ||g||^2``, 0 where ``g = 0`` (no offset: an offset would
    leave a part of ``g_s`` parallel to ``g`` in ``g_v``)."""
    return torch.where(g_sq > 0, inner / torch.where(g_sq > 0, g_sq, torch.ones_like(g_sq)), torch.zeros_like(g_sq))


def _tolerance(tensors: list[Tensor]) -> float:
    """4 machine epsilons of the working dtype, or the unit roundoff of the tensors' own dtype
    (below float32), whichever is larger."""
    return max((max(4.0 * torch.finfo(_working(t.dtype)).eps, torch.finfo(t.dtype).eps / 2) for t in tensors), default=0.0)


def _working(dtype: torch.dtype) -> torch.dtype:
    """The dtype the subtraction runs in: float32 at least."""
    return torch.promote_types(dtype, torch.float32)


def _subtract_(clean: list[Tensor], coefs: list[Tensor], grads: list[Tensor], fe: bool) -> None:
    """``clean <- grads + coef * clean`` per tensor (``g_v`` from ``g`` in ``clean`` and ``g_s``);
    tensors below float32 in float32, rounded once (one temporary of one tensor at a time)."""
    low = [i for i, t in enumerate(clean) if _working(t.dtype) != t.dtype]
    if low:
        for i in low:
            clean[i].copy_(torch.add(grads[i].to(torch.float32), clean[i].to(torch.float32), alpha=coefs[i].item()))
        keep = sorted(set(range(len(clean))) - set(low))
        clean, coefs, grads = [clean[i] for i in keep], [coefs[i] for i in keep], [grads[i] for i in keep]
    if len(set(map(id, coefs))) == 1:  # one global coefficient
        T.axpby_(clean, coefs[0], grads, 1.0, fe)
    else:
        T.mul_each_(clean, coefs, fe)
        T.add_(clean, grads, fe)


def orthogonal_part_(ctx: StepContext, layerwise: bool) -> float | dict[Tensor, float]:
    """Turn each kept clean gradient (``view.clean``) into ``g_v`` in place, with
    ``g_s`` in ``view.grads``; return ``||g_v||`` (per parameter when ``layerwise``)."""
    fe = ctx.foreach
    if not layerwise:
        inner = S.inner(ctx, [v.clean for v in ctx.groups], [v.grads for v in ctx.groups])  # type: ignore[misc]
        coef = -_ratio(inner, total(ctx.grad_sq))
        for v in ctx.groups:
            _subtract_(v.clean, [coef] * len(v.grads), v.grads, fe)  # type: ignore[arg-type]
        gv_sq = total(S.squares(ctx, [v.clean for v in ctx.groups]))  # type: ignore[misc]
        gv_norm, gs_norm = (math.sqrt(x) for x in host_floats([gv_sq, total(ctx.perturbed_sq or [])]))
        if gv_norm <= _tolerance([t for v in ctx.groups for t in v.params]) * gs_norm:
            for v in ctx.groups:
                T.zero_(v.clean, fe)  # type: ignore[arg-type]
            gv_norm = 0.0
        return gv_norm
    norms: dict[Tensor, float] = {}
    for v in ctx.groups:
        clean: list[Tensor] = v.clean  # type: ignore[assignment]
        inners, g_sqs = S.dots(ctx, [(clean, v.grads), (clean, clean)])
        _subtract_(clean, [-_ratio(i, s) for i, s in zip(inners, g_sqs)], v.grads, fe)
        gv_sqs, gs_sqs = S.dots(ctx, [(clean, clean), (v.grads, v.grads)])
        gv_norms, gs_norms = ([math.sqrt(x) for x in host_floats(sq)] for sq in (gv_sqs, gs_sqs))
        drop = [i for i, (a, b, t) in enumerate(zip(gv_norms, gs_norms, clean)) if a <= _tolerance([t]) * b]
        T.zero_([clean[i] for i in drop], fe)
        for i in drop:
            gv_norms[i] = 0.0
        norms.update(zip(v.params, gv_norms))
    return norms


def add_reuse_(opt: Any, ctx: StepContext, layerwise: bool) -> None:
    """A reuse step: ``g += alpha ||g|| / (||g_v|| + eps0) g_v`` in ``.grad`` for
    every parameter with a kept ``g_v`` (``opt.state[p]["g_v"]``), globally or
    per tensor; ``||g_v||`` was read at the SAM step, ``||g||`` costs one sync."""
    if all(v.group["alpha"] == 0.0 for v in ctx.groups):
        return
    index = {id(p): i for i, p in enumerate(opt._all_params())}
    g_norm = None if layerwise else math.sqrt(float(total(ctx.grad_sq)))
    for v in ctx.groups:
        alpha, eps0 = v.group["alpha"], v.group["norm_eps"]
        have = [(p, g) for p, g in zip(v.params, v.grads) if "g_v" in opt.state.get(p, {})]
        if alpha == 0.0 or not have:
            continue
        grads, gvs = [g for _, g in have], [opt.state[p]["g_v"] for p, _ in have]
        if g_norm is None:
            stored = opt.method_state["g_v_norms"]
            norms = [math.sqrt(x) for x in host_floats(S.dots(ctx, [(grads, grads)])[0])]
            coefs = [alpha * a / (stored[index[id(p)]] + eps0) for a, (p, _) in zip(norms, have)]
            T.add_each_(grads, gvs, coefs, ctx.foreach)
        else:
            T.add_(grads, gvs, ctx.foreach, alpha=alpha * g_norm / (opt.method_state["g_v_norm"] + eps0))
