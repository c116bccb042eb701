"""A GradScaler around the passes of one step, through its public API only.

``GradScaler.unscale_`` allows one call per optimizer between two
``update()`` calls, keyed by the optimizer object, while a sharpness-aware
step unscales two passes (more with chunks). Each pass therefore unscales
through its own small view object; every pass's inf check is recorded and
``update()`` sees them all. The step keeps the views alive until
``update()`` (an id must not be reused meanwhile).

An abandoned step (an exception, ``cancel_step``) must leave the scaler as
it was: its ``state_dict()`` is taken when the step opens, and on abandon
the step's records are flushed with ``update()`` and the state put back
with ``load_state_dict()``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class _GradsOf:
    """What ``GradScaler.unscale_`` reads from an optimizer: ``param_groups``."""

    def __init__(self, params: list[Tensor]) -> None:
        self.param_groups = [{"params": params}]


def enabled(scaler: object | None) -> bool:
    """Whether ``scaler`` is an enabled ``torch.amp.GradScaler`` (a disabled
    one leaves gradients alone, as PyTorch's does)."""
    if scaler is None:
        return False
    if not isinstance(scaler, torch.amp.GradScaler):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler.is_enabled()


class ScaledPasses:
    """The GradScaler of one step: unscale each pass, hear of a non-finite
    value, update once, or forget the step."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.views: list[_GradsOf] = []
        self._before: dict[str, Any] = scaler.state_dict()

    def unscale(self, params: list[Tensor]) -> None:
        """Divide the ``.grad`` of ``params`` by the scale in place and record
        the pass's inf/NaN check for ``update()``."""
        view = _GradsOf(params)
        self.views.append(view)
        self.scaler.unscale_(view)  # type: ignore[arg-type]

    def record_inf(self, device: torch.device) -> None:
        """A non-finite value the scaler's own check did not see (another
        replica's, or a sum of squares that overflowed): ``update()`` backs
        the scale off as for an inf."""
        dummy = torch.zeros(1, device=device, requires_grad=True)
        dummy.grad = torch.full((1,), float("inf"), device=device)
        self.unscale([dummy])

    def update(self) -> None:
        """Once per step, skipped or not (nothing to do when no pass was unscaled)."""
        if self.views:
            self.scaler.update()
        self.views.clear()

    def forget(self) -> None:
        """Leave the scaler as it was before the step."""
        if self.views:
            self.scaler.update()
            self.scaler.load_state_dict(self._before)
        self.views.clear()
