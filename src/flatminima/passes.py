"""What happens around the two passes: the one place that touches modules.

``preserve_running_stats`` keeps the running statistics of BatchNorm — and of
any module with running buffers — from being updated by the perturbed pass.
The official JAX SAM keeps the clean pass's batch statistics and discards the
perturbed pass's; the common PyTorch idiom of setting BatchNorm's momentum to
0 misses custom modules (and ``momentum=None`` cumulative averages, whose
``num_batches_tracked`` still moves). A snapshot and exact restore works for
any module and any update rule.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

BufferFilter = Callable[[nn.Module, str, Tensor], bool]


def is_running_buffer(module: nn.Module, name: str, buffer: Tensor) -> bool:
    """Default rule for buffers a training-mode forward may update: every
    buffer of a normalisation layer (``_NormBase``: BatchNorm, InstanceNorm,
    SyncBatchNorm) and any buffer named ``running_*`` or
    ``num_batches_tracked`` in any module."""
    return (
        isinstance(module, nn.modules.batchnorm._NormBase)
        or name.startswith("running")
        or name == "num_batches_tracked"
    )


def all_buffers(module: nn.Module, name: str, buffer: Tensor) -> bool:
    """Snapshot every buffer (for modules that keep statistics under other names)."""
    return True


def snapshot_running_stats(model: nn.Module, buffers: BufferFilter = is_running_buffer) -> Callable[[], None]:
    """Copy the selected buffers of ``model`` now; calling the returned
    function puts them back exactly (in place, or re-bound when the module
    replaced the tensor). :func:`preserve_running_stats` is this around a
    block; a method that decides only afterwards whether to restore (ESAM's
    retried clean pass) calls it directly."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    saved: list[tuple[nn.Module, str, Tensor, Tensor]] = []
    with torch.no_grad():
        for module in model.modules():
            for name, buf in module._buffers.items():
                if buf is not None and buffers(module, name, buf):
                    saved.append((module, name, buf, buf.clone()))

    def restore() -> None:
        with torch.no_grad():
            for module, name, original, copy in saved:
                current = module._buffers.get(name)
                if current is original:
                    original.copy_(copy)
                else:  # the module re-bound the attribute: put the original tensor back
                    original.copy_(copy)
                    module._buffers[name] = original

    return restore


@contextmanager
def preserve_running_stats(model: nn.Module, buffers: BufferFilter = is_running_buffer) -> Iterator[None]:
    """Restore the selected buffers of ``model`` exactly on exit.

    Use it around the perturbed pass of the explicit two-step API (the
    closure API does it for you when the optimizer is given ``model=``)::

        loss_fn(model(x), y).backward()
        optimizer.first_step(zero_grad=True)
        with flatminima.preserve_running_stats(model):
            loss_fn(model(x), y).backward()
        optimizer.second_step(zero_grad=True)

    ``buffers`` chooses which buffers to snapshot (default:
    :func:`is_running_buffer`; :func:`all_buffers` takes every one). Buffers
    are restored in place, or re-bound when the module replaced the tensor.
    """
    restore = snapshot_running_stats(model, buffers)
    try:
        yield
    finally:
        restore()


# ---------------------------------------------------------------------- GradScaler
class _GradsOf:
    """What ``GradScaler.unscale_`` reads from an optimizer: ``param_groups``.

    The scaler allows one ``unscale_`` per optimizer between two
    ``update()`` calls, keyed by ``id(optimizer)``, while a sharpness-aware
    step unscales two passes (more with chunks). Each pass unscales through
    its own view, so every pass's inf check is recorded and ``update()``
    sees them all: the public API, used once per pass. The step keeps the
    views alive until ``update()`` (an id must not be reused meanwhile).
    """

    def __init__(self, params: list[Tensor]) -> None:
        self.param_groups = [{"params": params}]


def scaler_enabled(scaler: object | None) -> bool:
    """Whether ``scaler`` is an enabled ``torch.amp.GradScaler`` (a disabled
    one, ``enabled=False``, leaves gradients alone as PyTorch's does)."""
    if scaler is None:
        return False
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler.is_enabled()


def unscale_pass(scaler: torch.amp.GradScaler, params: list[Tensor], keep: list[object]) -> None:
    """Divide the ``.grad`` of ``params`` by the scale in place and record
    the pass's inf/NaN check on the scaler (for its ``update()``)."""
    view = _GradsOf(params)
    keep.append(view)
    scaler.unscale_(view)  # type: ignore[arg-type]


def record_inf(scaler: torch.amp.GradScaler, keep: list[object], device: torch.device) -> None:
    """Tell the scaler this step found a non-finite value that its own check
    did not see (another replica's gradient, or a sum of squares that
    overflowed), so that ``update()`` backs the scale off as for an inf."""
    dummy = torch.zeros(1, device=device, requires_grad=True)
    dummy.grad = torch.full((1,), float("inf"), device=device)  # inf after unscaling too
    unscale_pass(scaler, [dummy], keep)


def forget_passes(scaler: torch.amp.GradScaler, keep: list[object]) -> None:
    """Drop the records of an abandoned step (``cancel_step``) so that the
    scaler is as it was before the step: no update, no stale inf check."""
    states = getattr(scaler, "_per_optimizer_states", None)
    if states is not None:
        for view in keep:
            states.pop(id(view), None)
    keep.clear()


# ---------------------------------------------------------------------- DDP
def ddp_module(model: nn.Module | None) -> nn.parallel.DistributedDataParallel | None:
    """``model`` when it is a ``DistributedDataParallel`` wrapper, else None."""
    return model if isinstance(model, nn.parallel.DistributedDataParallel) else None


def world_size(group: object) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)  # type: ignore[arg-type]


def all_ranks_true(flag: bool, group: object, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank (one scalar all-reduce): the
    ranks must agree on skipping a step, or their collectives fall out of
    step."""
    return not on_any_rank([not flag], group, device)[0]


def on_any_rank(flags: list[bool], group: object, device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks (one collective of ``len(flags)`` bytes)."""
    import torch.distributed as dist

    t = torch.tensor(flags, dtype=torch.uint8, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    return [bool(x) for x in t.tolist()]


_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32: bounds the flat buffer's memory


def all_reduce_mean_(tensors: list[Tensor], group: object, device: torch.device) -> None:
    """Average ``tensors`` across the ranks of ``group`` in place, through
    flat buffers of at most ``_BUCKET_ELEMENTS`` per device and dtype (a
    few collectives instead of one per tensor).

    Every rank must call it, with the same tensor shapes in the same order:
    one small collective checks that first, and every rank raises the same
    ValueError when they differ (ranks whose gradients cover different
    parameters), where mismatched buffers would hang or mix values.
    """
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    count, numel = float(len(tensors)), float(sum(t.numel() for t in tensors))
    sig = torch.tensor([count, numel, -count, -numel], dtype=torch.float64, device=device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    if sig[0] != -sig[2] or sig[1] != -sig[3]:
        raise ValueError(
            "the replicas' gradients cover different parameters (unused parameters on some ranks), so "
            "their per-replica values cannot be averaged; make every rank give every trained parameter a "
            "gradient, or pass sync_perturbations=True (DDP then averages both passes itself)"
        )
    n = world_size(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for t in tensors:
        lists = buckets.setdefault((t.device, t.dtype), [[]])
        if lists[-1] and sum(x.numel() for x in lists[-1]) + t.numel() > _BUCKET_ELEMENTS:
            lists.append([])
        lists[-1].append(t)
    for lists in buckets.values():
        for bucket in lists:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)  # type: ignore[arg-type]
            flat.div_(n)
            for t, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(avg)
