"""What the hooks of one step see: the per-group views and the step's context."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class GroupView:
    """The parameters of one param group that take part in this step."""

    group: dict[str, Any]
    params: list[Tensor]
    grads: list[Tensor]
    clean: list[Tensor] | None = None  # copy of g, for methods that keep it
    saved: list[Tensor] | None = None  # w before the perturbation (a copy, or w's own storage)
    swapped: bool = False  # the params point at w + eps in their gradients' buffers


@dataclass
class StepContext:
    """What the hooks of one step see. Norms are 0-dim tensors (no sync)."""

    groups: list[GroupView]
    foreach: bool
    grad_sq: list[Tensor]  # per group ||g||^2
    perturbed: bool = False
    perturbed_sq: list[Tensor] | None = None  # per group ||g_p||^2
    extra: dict[str, Any] = field(default_factory=dict)  # hook-to-hook scratch
    #: DDP process group when eps is per replica (gradients of the clean pass are local), else None
    group: Any = None
    #: m-sharpness on one device: this context is one chunk's, or the chunks' mean
    chunked: bool = False
    scaling: Any = None  # the step's _scaling.ScaledPasses, when a GradScaler is in use
    #: what the closure handed to this step (``SharpnessAware.note``), e.g. per-sample losses
    data: dict[str, Any] = field(default_factory=dict)
    #: a step without a perturbed pass: the gradients taken out of ``.grad`` by
    #: first_step() and put back by second_step() (``_views.set_aside``)
    aside: list[tuple[Tensor, Tensor]] | None = None
    #: the parameters' sharding (``_sharding.Shards``: FSDP1, FSDP2), whose global norms are all-reduced; None: whole tensors
    shards: Any = None
    #: ``||g||^2`` of a clean pass whose finite check waits for the perturbed pass's (``_deferred``)
    clean_total: Tensor | None = None

    @property
    def grad_norm(self) -> Tensor:
        return total(self.grad_sq).sqrt()

    @property
    def perturbed_norm(self) -> Tensor:
        if self.perturbed_sq is None:
            raise RuntimeError("no perturbed pass in this step")
        return total(self.perturbed_sq).sqrt()


def total(values: list[Tensor]) -> Tensor:
    """Sum per-group reductions that may live on different devices."""
    if not values:
        return torch.zeros(())
    if len(values) == 1 and values[0].dtype in (torch.float32, torch.float64):
        return values[0]  # one group (the common case): the sum is the value, no stack and sum kernels
    device = values[0].device
    acc = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
    return torch.stack([v.to(device=device, dtype=acc) for v in values]).sum()
