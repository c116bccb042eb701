"""Sums over the shards of a step with one ``eps`` per shard (m-sharpness).

With ``step(closure, chunks=n)`` every chunk of the batch runs its clean and
perturbed passes in turn, each with the ``eps`` of its own gradient; the
step then descends along the mean over chunks (Foret et al. 2021, §4.1:
the gradient of ``(1/n) sum_i max_{||eps_i|| <= rho} L_i(w + eps_i)``).
This module holds that loop (:class:`ChunkedSteps`, a base of
:class:`~flatminima.SharpnessAware`) and the running sums between the chunks
(:class:`ShardSum`). Under DDP the same per-shard semantics applies to the
replicas, and the one-pass-per-chunk loop runs every pass locally, averaging
over the replicas at the end of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from functools import partial
from typing import Any, ContextManager

import torch
from torch import Tensor

from . import passes as P
from ._context import GroupView, StepContext


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


class ChunkedSteps:
    """``step(closure, chunks=n)`` of :class:`~flatminima.SharpnessAware`: every
    chunk's clean and perturbed passes in turn, then one descent along the
    chunks' means (averaged over DDP replicas too). It drives the same
    protocol pieces as a plain step (``_open``, ``_perturb``,
    ``_close_perturbed``, ``_descend``), defined on the optimizer."""

    def _chunked_step(self, closure: Callable[[int], Any], n: int, scaler: Any) -> Any:
        """m-sharpness: every chunk's clean and perturbed passes in turn, one
        descent along the averaged gradients (see :meth:`step`)."""
        ddp = P.ddp_module(self.model)
        if ddp is not None and self.sync_perturbations:
            raise ValueError(
                "chunks= gives every chunk its own eps, sync_perturbations=True one eps for all replicas: "
                "use one or the other"
            )
        group = ddp.process_group if ddp is not None and P.world_size(ddp.process_group) > 1 else None
        views: list[object] = []
        enabled = P.scaler_enabled(scaler)
        self._scaler = scaler if enabled else None
        losses: list[Any] = []
        try:
            decided: bool | None = None
            extra: dict[str, Any] = {}
            if self.decides_from_gradient:
                # The decision needs the batch gradient: one clean sweep first.
                sums = self._chunk_sweep(closure, n, scaler, group, views, losses, perturb=False)
                if sums is None:
                    return _mean(losses)
                ctx = self._chunk_mean(sums, n, group, perturbed=False)
                if not self._perturb_this_step(ctx):
                    self._descend(ctx)
                    return _mean(losses)
                decided, extra, losses = True, ctx.extra, []
            sums = self._chunk_sweep(closure, n, scaler, group, views, losses, perturb=decided)
            if sums is None:
                return _mean(losses)
            ctx = self._chunk_mean(sums, n, group, perturbed=sums.perturbed)
            ctx.extra = {**extra, **ctx.extra}
            self._descend(ctx)
            return _mean(losses)
        except BaseException:
            if enabled:
                P.forget_passes(scaler, views)  # an abandoned step leaves the scaler as it was
            raise
        finally:
            self._scaler = None
            if enabled and views:
                scaler.update()

    def _chunk_sweep(
        self,
        closure: Callable[[int], Any],
        n: int,
        scaler: Any,
        group: Any,
        views: list[object],
        losses: list[Any],
        perturb: bool | None,
    ) -> Any:
        """Run every chunk (clean pass, and the perturbed pass when the method
        perturbs: ``perturb``, or its own choice at the first chunk) and sum
        the results; None when a non-finite gradient skipped the step."""
        local = self._chunk_pass_context()
        sums = ShardSum(self.shard_state)
        for i in range(n):
            chunk = partial(closure, i)
            with local():
                losses.append(self._run_closure(chunk, "clean"))
            with torch.no_grad():
                ctx = self._open(scaler, group, views)
                ctx.chunked = True
                if not self._finite(ctx, ctx.grad_sq, every_rank=True):
                    self._count_skip("clean")
                    return None
                if perturb is None:
                    perturb = self._perturb_this_step(ctx)
                    sums.extra = ctx.extra  # the decision's own notes (committed after the step)
                if perturb:
                    self._perturb(ctx)
                    self.zero_grad()
            if perturb:
                try:
                    with local(), self.perturbed_pass():
                        self._run_closure(chunk, "perturbed")
                except BaseException:
                    with torch.no_grad():
                        self._restore(ctx)
                    raise
                with torch.no_grad():
                    if not self._close_perturbed(ctx):
                        return None
            sums.add(ctx)
        return sums

    def _chunk_pass_context(self) -> Callable[[], ContextManager[Any]]:
        ddp = P.ddp_module(self.model)
        return ddp.no_sync if ddp is not None else nullcontext

    @torch.no_grad()
    def _chunk_mean(self, sums: Any, n: int, group: Any, perturbed: bool) -> StepContext:
        """The step's context from the chunks' sums: mean gradients in
        ``.grad``, averaged over the replicas too under DDP."""
        groups = sums.mean_views(self.param_groups, n)
        fe = self._use_foreach(groups)
        ctx = StepContext(groups, fe, sums.grad_sq(n), perturbed=perturbed, group=group, chunked=True)
        ctx.extra = sums.mean_state(n)
        if group is not None:
            self._average_shard_values(ctx, grads=True)
        else:
            self._shard_norms(ctx)
        return ctx


def _mean(losses: list[Any]) -> Any:
    """Mean of the chunks' losses (tensors detached: the graphs are gone)."""
    if not losses or any(x is None for x in losses):
        return None
    if all(isinstance(x, Tensor) for x in losses):
        return torch.stack([x.detach() for x in losses]).mean()
    return sum(float(x) for x in losses) / len(losses)
