"""Sums over the shards of a step with one ``eps`` per shard (m-sharpness).

With ``step(closure, chunks=n)`` every chunk of the batch runs its clean and
perturbed passes in turn, each with the ``eps`` of its own gradient; the
step then descends along the mean over chunks (Foret et al. 2021, §4.1:
the gradient of ``(1/n) sum_i max_{||eps_i|| <= rho} L_i(w + eps_i)``).
This module holds those running sums between the chunks.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from ._base import GroupView


def _add(sums: dict[Tensor, Tensor], key: Tensor, value: Tensor, steal: bool) -> None:
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value if steal else value.clone()


class ShardSum:
    """Per-parameter sums of the chunks' gradients (perturbed ones when the
    step perturbs), kept clean gradients and the method's ``shard_state``.

    Memory: the sum of gradients takes over the first chunk's ``.grad``
    tensors (``p.grad`` is unset, so the next chunk's backward cannot write
    into it), so it costs one copy of the parameters beyond a plain step.
    """

    def __init__(self, state_keys: Iterable[str]) -> None:
        self.grads: dict[Tensor, Tensor] = {}
        self.clean: dict[Tensor, Tensor] | None = None
        self.state: dict[str, dict[Tensor, Tensor]] = {key: {} for key in state_keys}
        self.extra: dict[str, Any] = {}  # the decision's notes, from the first chunk
        self.perturbed = False
        self._grad_sq: list[Tensor] | None = None

    @torch.no_grad()
    def add(self, ctx: Any) -> None:
        """Add one chunk, whose gradients are in ``.grad`` (``g_p`` after a
        perturbed pass, else ``g``)."""
        self.perturbed = ctx.perturbed
        for v in ctx.groups:
            for p, g in zip(v.params, v.grads):
                _add(self.grads, p, g, steal=p.grad is g)
                if p.grad is g:
                    p.grad = None
            if v.clean is not None:
                self.clean = {} if self.clean is None else self.clean
                for p, c in zip(v.params, v.clean):
                    _add(self.clean, p, c, steal=True)  # the chunk's copy, unused after this
        for key, sums in self.state.items():
            for p, value in ctx.extra.get(key, {}).items():
                if value is not None:
                    _add(sums, p, value, steal=True)
        squares = [s.detach().double() for s in ctx.grad_sq]
        self._grad_sq = squares if self._grad_sq is None else [a + b for a, b in zip(self._grad_sq, squares)]

    def mean_views(self, param_groups: list[dict[str, Any]], n: int) -> list[GroupView]:
        """Write the mean gradients into ``.grad`` and return the step's
        views. A parameter with a gradient in some chunks only counts zero in
        the others (the mean is over all ``n`` chunks, as DDP's is over
        replicas)."""
        views = []
        for group in param_groups:
            params = [p for p in group["params"] if p in self.grads]
            for p in params:
                p.grad = self.grads[p].div_(n)
            view = GroupView(group, params, [p.grad for p in params])
            if self.clean is not None:
                view.clean = [
                    self.clean[p].div_(n) if p in self.clean else torch.zeros_like(p) for p in params
                ]
            views.append(view)
        self.grads, self.clean = {}, None
        return views

    def mean_state(self, n: int) -> dict[str, Any]:
        """The decision's notes and the mean of each ``shard_state`` entry."""
        means = {key: {p: s.div_(n) for p, s in sums.items()} for key, sums in self.state.items()}
        return {**self.extra, **means}

    def grad_sq(self, n: int) -> list[Tensor]:
        """The mean over chunks of each group's ``||g_i||^2``."""
        assert self._grad_sq is not None
        return [s / n for s in self._grad_sq]
