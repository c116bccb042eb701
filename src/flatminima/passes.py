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
