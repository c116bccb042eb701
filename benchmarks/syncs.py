"""Host synchronisations of a step, counted.

On CUDA, :func:`count_cuda_syncs` counts what PyTorch itself reports with
``torch.cuda.set_sync_debug_mode("warn")``: one warning per operation that
waits for the device (``.item()``, ``bool(tensor)``, a copy to the host, ...).

On any device, :func:`count_host_reads` counts the calls that read a tensor's
value into Python (``item``, ``bool``, ``float``, ``int``, ``tolist``...)
with a ``TorchFunctionMode``: on CUDA each is a synchronisation, on CPU it
is free, so on a machine without a GPU it is the CPU-side stand-in for the
count (it misses a sync a kernel makes by itself, such as ``nonzero``'s).
"""

from __future__ import annotations

import collections
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

#: the Tensor methods that hand a value to the host
HOST_READS = {
    torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.nonzero, torch.Tensor.cpu,
}


class _HostReads(TorchFunctionMode):
    def __init__(self) -> None:
        super().__init__()
        self.where: collections.Counter[str] = collections.Counter()

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if func in HOST_READS:
            self.where[_caller()] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    """``file:line function`` of the innermost frame outside torch and this module: the code
    that read the value."""
    for frame in reversed(traceback.extract_stack()):
        path = frame.filename.replace("\\", "/")
        if "/torch/" not in path and not path.endswith("benchmarks/syncs.py"):
            return f"{path.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
    return "?"


def count_host_reads(fn: Callable[[], Any], calls: int = 1) -> tuple[float, dict[str, int]]:
    """Host reads per call of ``fn`` (mean over ``calls``) and where they happen."""
    mode = _HostReads()
    with mode:
        for _ in range(calls):
            fn()
    return sum(mode.where.values()) / calls, dict(mode.where)


def count_cuda_syncs(fn: Callable[[], Any], calls: int = 1) -> tuple[float, dict[str, int]]:
    """Synchronisations per call of ``fn`` on CUDA, as ``set_sync_debug_mode("warn")`` reports them."""
    if not torch.cuda.is_available():
        raise RuntimeError("count_cuda_syncs needs CUDA; use count_host_reads on CPU")
    old = torch.cuda.get_sync_debug_mode()
    where: collections.Counter[str] = collections.Counter()
    try:
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(calls):
                fn()
        for w in caught:
            if "synchroniz" in str(w.message):
                where[f"{w.filename.rsplit('/', 1)[-1]}:{w.lineno}"] += 1
    finally:
        torch.cuda.set_sync_debug_mode(old)
    return sum(where.values()) / calls, dict(where)
