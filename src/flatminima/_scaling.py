"""A GradScaler around the passes of one step, through its public API only.

``GradScaler.unscale_`` records an inf check per optimizer, to be read by
``update()``, and nothing in its public API can withdraw a record. A
sharpness-aware step may be abandoned (an exception in a pass,
``cancel_step``), and must then leave the scaler exactly as it was, other
optimizers' records included. So the step unscales each pass itself, with
the scaler's own kernel and inverse scale (``1 / get_scale()``, computed in
float64 as the scaler does: the same bits), keeps its own inf flag, and
tells the scaler only when the step is taken: one small unscaled tensor that
carries the flag through ``unscale_``, then ``update()``. An abandoned step
has told the scaler nothing.

The closure must scale its loss with this scaler (``scaler.scale(loss)``):
the gradients are divided by the scaler's current scale whether or not it
was used.
"""

from __future__ import annotations

from collections import defaultdict

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
        self._inv: float | None = None  # 1 / scale, read once per step
        self._found: dict[torch.device, Tensor] = {}  # per device: 1.0 where a pass had an inf/NaN

    def unscale(self, params: list[Tensor]) -> None:
        """Divide the ``.grad`` of ``params`` by the scale in place, as
        ``GradScaler.unscale_`` would, and note any inf/NaN."""
        if self._inv is None:  # the scaler's float64 reciprocal of its float32 scale
            scale = torch.tensor(self.scaler.get_scale(), dtype=torch.float32)
            self._inv = float(scale.double().reciprocal().float())
        buckets: dict[tuple[torch.device, torch.dtype], list[Tensor]] = defaultdict(list)
        for p in params:
            if p.grad is None:
                continue
            if p.grad.dtype == torch.float16:
                raise ValueError(
                    "Attempting to unscale FP16 gradients: keep the parameters in float32 and run the forward "
                    "under torch.autocast (GradScaler refuses FP16 gradients too)"
                )
            buckets[(p.grad.device, p.grad.dtype)].append(p.grad)
        for (device, _), grads in buckets.items():
            found = self._found.setdefault(device, torch.zeros((), dtype=torch.float32, device=device))
            inv = torch.full((), self._inv, dtype=torch.float32, device=device)
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)

    def record_inf(self, device: torch.device) -> None:
        """A non-finite value the unscaling did not see (another replica's, or
        a sum of squares that overflowed): ``update()`` backs the scale off."""
        self._found[device] = torch.ones((), dtype=torch.float32, device=device)

    def update(self) -> None:
        """Once per step taken (skipped or not): the step's inf flag reaches
        the scaler through ``unscale_``, then ``update()``."""
        if self._inv is None and not self._found:
            return  # nothing was unscaled: the scaler has nothing to hear
        device = next(iter(self._found), torch.device("cpu"))
        flag = sum((f.to(device) for f in self._found.values()), torch.zeros((), device=device))
        carrier = torch.zeros(1, device=device, requires_grad=True)
        carrier.grad = torch.where(flag > 0, float("inf"), 0.0).reshape(1)  # inf after unscaling too
        self.scaler.unscale_(_GradsOf([carrier]))  # type: ignore[arg-type]
        self.scaler.update()
        self._inv, self._found = None, {}

    def forget(self) -> None:
        """An abandoned step: the scaler never heard of it."""
        self._inv, self._found = None, {}
