"""Multi-tensor kernels, each with a fast path and a plain per-tensor path.

Every function takes ``foreach``: ``True`` runs ``torch._foreach_*`` kernels on
tensors grouped by (device, dtype) — one kernel launch per group instead of
one per tensor; ``False`` runs the obvious per-tensor loop, which is the
reference the fast path is tested against. Both paths do the same arithmetic
in the same dtype, so they agree to rounding of the reductions.

Reductions (norms, dot products) accumulate in float32, or float64 when any
input is float64, and return a 0-dim tensor on the device of the first
input: no host synchronisation happens here; callers decide when to sync.

All in-place kernels write into their first argument and allocate nothing
parameter-sized, so a SAM step's memory is exactly what its caller allocates.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from typing import overload

import torch
from torch import Tensor

TensorList = Sequence[Tensor]
Scalar = float | Tensor


def accumulate_dtype(tensors: TensorList) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _grouped(*lists: TensorList) -> list[tuple[list[Tensor], ...]]:
    """Split parallel lists into sublists sharing the first list's (device, dtype)."""
    first = lists[0]
    if first and all(t.device == first[0].device and t.dtype == first[0].dtype for t in first):
        return [tuple(list(x) for x in lists)]  # the common case: one bucket, no dict work
    buckets: dict[tuple[torch.device, torch.dtype], tuple[list[Tensor], ...]] = defaultdict(
        lambda: tuple([] for _ in lists)
    )
    for items in zip(*lists):
        bucket = buckets[(items[0].device, items[0].dtype)]
        for out, item in zip(bucket, items):
            out.append(item)
    return list(buckets.values())


@overload
def _on(scale: Tensor, device: torch.device) -> Tensor: ...
@overload
def _on(scale: float, device: torch.device) -> float: ...
def _on(scale: Scalar, device: torch.device) -> Scalar:
    return scale.to(device, non_blocking=True) if isinstance(scale, Tensor) else scale


def _foreach_factor(scale: Scalar, group: list[Tensor]) -> Scalar:
    """``scale`` for ``torch._foreach_mul_`` on ``group``. On CPU that kernel
    rounds a Python-number factor to a bfloat16/float16 list's own dtype
    first (0.9 -> 0.8984 in bfloat16), unlike ``Tensor.mul_``; a 0-dim float32
    tensor keeps it exact, so both paths give the same bits."""
    t = group[0]
    if not isinstance(scale, Tensor) and t.device.type == "cpu" and t.dtype in (torch.bfloat16, torch.float16):
        return torch.tensor(scale, dtype=torch.float32)
    return _on(scale, t.device)


def _zero(tensors: TensorList, dtype: torch.dtype | None = None) -> Tensor:
    device = tensors[0].device if tensors else torch.device("cpu")
    return torch.zeros((), dtype=dtype or torch.float32, device=device)


def sum_of_squares(tensors: TensorList, foreach: bool, acc: torch.dtype | None = None) -> Tensor:
    """``sum_i ||t_i||^2`` accumulated in float32/float64, or in ``acc`` (inf/NaN propagate)."""
    if not tensors:
        return _zero(tensors)
    acc = acc or accumulate_dtype(tensors)
    target = tensors[0].device
    if not foreach:
        total = _zero(tensors, acc)
        for t in tensors:
            total = total + t.detach().to(acc).pow(2).sum().to(target)
        return total
    parts = []
    for (group,) in _grouped(tensors):
        norms = torch._foreach_norm(group, 2, dtype=acc)
        parts.append(torch.stack(norms).pow(2).sum().to(target))
    return torch.stack(parts).sum() if len(parts) > 1 else parts[0]


def dot(a: TensorList, b: TensorList, foreach: bool) -> Tensor:
    """``sum_i <a_i, b_i>`` accumulated in float32/float64.

    There is no fused multi-tensor dot product in PyTorch; the fast path
    batches the per-tensor results into one stack/sum instead of a chain of
    scalar additions.
    """
    if not a:
        return _zero(a)
    acc = accumulate_dtype(list(a) + list(b))
    target = a[0].device
    terms = [torch.dot(x.detach().reshape(-1).to(acc), y.detach().reshape(-1).to(acc)).to(target) for x, y in zip(a, b)]
    if foreach:
        return torch.stack(terms).sum()
    total = _zero(a, acc)
    for term in terms:
        total = total + term
    return total


def dots(a: TensorList, b: TensorList, foreach: bool) -> list[Tensor]:
    """Per-tensor inner products ``[<a_i, b_i>]`` (``dots(a, a)``: per-tensor
    squared norms), each a 0-dim tensor on ``a_i``'s device, accumulated in
    float32, or float64 when ``a_i`` or ``b_i`` is float64.

    There is no multi-tensor dot product in PyTorch: both paths compute the
    same per-tensor products (the fast path only skips the Python-level
    accumulation that :func:`dot` does), so they give the same bits.
    """
    out = []
    for x, y in zip(a, b):
        acc = torch.float64 if torch.float64 in (x.dtype, y.dtype) else torch.float32
        out.append(torch.dot(x.detach().reshape(-1).to(acc), y.detach().reshape(-1).to(acc)))
    return out


def mul_(tensors: TensorList, scale: Scalar, foreach: bool) -> None:
    """``t <- t * scale`` with a Python number or a 0-dim tensor."""
    if not foreach:
        for t in tensors:
            t.mul_(_on(scale, t.device))
        return
    for (group,) in _grouped(tensors):
        torch._foreach_mul_(group, _foreach_factor(scale, group))


def mul_elementwise_(tensors: TensorList, factors: TensorList, foreach: bool) -> None:
    """``t_i <- t_i * f_i``."""
    if not foreach:
        for t, f in zip(tensors, factors):
            t.mul_(f)
        return
    for group, fgroup in _grouped(tensors, factors):
        torch._foreach_mul_(group, fgroup)


def mul_each_(tensors: TensorList, scales: TensorList, foreach: bool) -> None:
    """``t_i <- t_i * c_i`` with one 0-dim tensor ``c_i`` per tensor."""
    if not foreach:
        for t, c in zip(tensors, scales):
            t.mul_(_on(c, t.device))
        return
    for group, cgroup in _grouped(tensors, scales):
        dev = group[0].device
        torch._foreach_mul_(group, [_on(c, dev) for c in cgroup])


def add_each_(dst: TensorList, src: TensorList, alphas: Sequence[float], foreach: bool) -> None:
    """``d_i <- d_i + a_i * s_i`` with one Python number ``a_i`` per tensor (fused,
    no temporary). PyTorch has no multi-tensor kernel with one ``alpha`` per
    tensor, so both paths run the same per-tensor ``add_``."""
    for d, s, a in zip(dst, src, alphas):
        d.add_(s, alpha=a)


def zero_(tensors: TensorList, foreach: bool) -> None:
    """``t_i <- 0``."""
    if not foreach:
        for t in tensors:
            t.zero_()
        return
    for (group,) in _grouped(tensors):
        torch._foreach_zero_(group)


def div_elementwise_(tensors: TensorList, divisors: TensorList, foreach: bool) -> None:
    """``t_i <- t_i / f_i``."""
    if not foreach:
        for t, f in zip(tensors, divisors):
            t.div_(f)
        return
    for group, fgroup in _grouped(tensors, divisors):
        torch._foreach_div_(group, fgroup)


def add_(dst: TensorList, src: TensorList, foreach: bool, alpha: float = 1.0) -> None:
    """``d_i <- d_i + alpha * s_i`` (alpha a Python number: no temporaries)."""
    if not foreach:
        for d, s in zip(dst, src):
            d.add_(s, alpha=alpha)
        return
    for dgroup, sgroup in _grouped(dst, src):
        torch._foreach_add_(dgroup, sgroup, alpha=alpha)


def add_into_(bufs: TensorList, base: TensorList, alpha: float) -> None:
    """``b_i <- base_i + alpha * b_i``, written into ``bufs`` in one pass.

    The same kernel, and so the same rounding, as ``base_i.add_(b_i,
    alpha=alpha)`` (:func:`add_` on either path), with the result in the
    other operand's buffer. There is no multi-tensor form of it; the
    per-tensor loop costs a few microseconds per tensor and saves a full
    read and write of ``bufs`` against a scale-then-add.
    """
    for b, w in zip(bufs, base):
        torch.add(w, b, alpha=alpha, out=b)


def axpby_(dst: TensorList, a: Scalar, src: TensorList, b: Scalar, foreach: bool) -> None:
    """``d_i <- a * d_i + b * s_i`` in place on ``dst`` (``src`` is not changed).

    With tensor coefficients this needs one temporary per tensor on the
    per-tensor path and one per (device, dtype) group on the fast path.
    """
    if not foreach:
        for d, s in zip(dst, src):
            d.mul_(_on(a, d.device))
            if isinstance(b, Tensor):
                d.add_(s * _on(b, d.device))
            else:
                d.add_(s, alpha=b)  # as the fast path: no rounded temporary s * b
        return
    for dgroup, sgroup in _grouped(dst, src):
        dev = dgroup[0].device
        torch._foreach_mul_(dgroup, _foreach_factor(a, dgroup))
        if isinstance(b, Tensor):
            torch._foreach_add_(dgroup, torch._foreach_mul(sgroup, _on(b, dev)))
        else:
            torch._foreach_add_(dgroup, sgroup, alpha=b)


def copy_(dst: TensorList, src: TensorList, foreach: bool) -> None:
    if not foreach:
        for d, s in zip(dst, src):
            d.copy_(s)
        return
    for dgroup, sgroup in _grouped(dst, src):
        torch._foreach_copy_(dgroup, sgroup)


def clone(tensors: TensorList, foreach: bool) -> list[Tensor]:
    """Detached copies (one parameter-sized allocation per tensor)."""
    out = [torch.empty_like(t, memory_format=torch.preserve_format) for t in tensors]
    copy_(out, [t.detach() for t in tensors], foreach)
    return out


def abs_plus_(dst: TensorList, src: TensorList, eta: float, foreach: bool) -> None:
    """``d_i <- |s_i| + eta`` (the ASAM operator T_w, written into ``dst``)."""
    if not foreach:
        for d, s in zip(dst, src):
            torch.abs(s.detach(), out=d).add_(eta)
        return
    for dgroup, sgroup in _grouped(dst, src):
        torch._foreach_copy_(dgroup, [s.detach() for s in sgroup])
        torch._foreach_abs_(dgroup)
        torch._foreach_add_(dgroup, eta)


def sqrt_one_plus_sq_(dst: TensorList, src: TensorList, eta: float, foreach: bool) -> None:
    """``d_i <- sqrt(1 + eta * s_i^2)`` elementwise, written into ``dst``
    (Fisher SAM's diagonal ``sqrt(f)``; ``eta=0`` gives exactly 1)."""
    if not foreach:
        for d, s in zip(dst, src):
            s = s.detach()
            torch.mul(s, s, out=d).mul_(eta).add_(1.0).sqrt_()
        return
    for dgroup, sgroup in _grouped(dst, src):
        sgroup = [s.detach() for s in sgroup]
        torch._foreach_copy_(dgroup, sgroup)
        torch._foreach_mul_(dgroup, sgroup)
        torch._foreach_mul_(dgroup, _foreach_factor(eta, dgroup))
        torch._foreach_add_(dgroup, 1.0)
        torch._foreach_sqrt_(dgroup)


def centralize_(tensors: TensorList) -> None:
    """Gradient centralisation: subtract, from each tensor with >= 2 dims, its
    mean over every dim but the first (Yong et al., 2020). 0/1-dim tensors are
    left alone. The mean is a per-tensor reduction with no multi-tensor
    kernel, so both paths run this loop."""
    for t in tensors:
        if t.dim() >= 2:
            t.sub_(t.mean(dim=tuple(range(1, t.dim())), keepdim=True))


def is_finite(value: Tensor) -> bool:
    """Host-side check of a reduced value (one device synchronisation). The value is read and
    checked on the host: the same answer as ``torch.isfinite``, without its kernel (7 us on CPU)."""
    return math.isfinite(value.item())


def can_swap(params: TensorList, grads: TensorList) -> bool:
    """Whether every parameter may point at its gradient's buffer during the
    perturbed pass: a plain gradient tensor, each of the two the sole owner
    of its storage (not a view: a DDP bucket view as ``.grad``; not part of
    a larger buffer: RNN weights flattened by ``flatten_parameters()``,
    whose ``.data`` is a slice without being a view), the same strides.
    (``.grad`` has the parameter's dtype, shape and device: autograd's
    setter enforces it.) Not FSDP1's shards (``_fsdp_flattened``): FSDP1 all-gathers
    from the storage it recorded, not from ``.data``."""
    for p, g in zip(params, grads):
        if getattr(p, "_fsdp_flattened", False):
            return False
        if type(g) is not Tensor or g.stride() != p.stride() or not (_sole_owner(p) and _sole_owner(g)):
            return False
    return True


def _sole_owner(t: Tensor) -> bool:
    return not t._is_view() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.numel() * t.element_size()


def add_scaled_(dst: TensorList, src: TensorList, coef: Scalar, foreach: bool) -> None:
    """``d_i <- d_i + coef * s_i`` with a Python number or a 0-dim tensor ``coef``."""
    if isinstance(coef, Tensor):
        axpby_(dst, 1.0, src, coef, foreach)
    else:
        add_(dst, src, foreach, alpha=coef)
