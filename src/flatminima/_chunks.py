"""m-sharpness on one device: ``step(closure, chunks=n)``.

Every chunk of the batch runs its clean and perturbed passes in turn, each
with the ``eps`` of its own gradient; the step then descends along the mean
over chunks (Foret et al. 2021, §4.1: the gradient of
``(1/n) sum_i max_{||eps_i|| <= rho} L_i(w + eps_i)``). A driver, not a base
class: it calls the protocol's pieces through :class:`Protocol`. Under DDP
every pass runs locally and the means are averaged over the replicas at the
end of the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, ContextManager, Protocol as _Protocol

import torch
from torch import Tensor

from . import _views as views
from ._context import GroupView, StepContext
from ._replicas import Replicas, all_reduce_mean_, shard_norms
from ._scaling import ScaledPasses, enabled


class Protocol(_Protocol):
    """The pieces of :class:`~flatminima.SharpnessAware` a chunked step drives."""

    param_groups: list[dict[str, Any]]
    foreach: bool | None
    _scaler: Any

    @property
    def keeps_clean_grad(self) -> bool: ...
    @property
    def decides_from_gradient(self) -> bool: ...
    @property
    def shard_state(self) -> tuple[str, ...]: ...

    def _replicas(self) -> Replicas: ...
    def _run_closure(self, closure: Callable[..., Any], which: str) -> Any: ...
    def _open(self, scaler: Any, group: Any, scaling: ScaledPasses | None = None) -> StepContext: ...
    def _finite(self, ctx: StepContext, squares: list[Tensor], every_rank: bool) -> bool: ...
    def _count_skip(self, where: str) -> None: ...
    def _decide(self, ctx: StepContext) -> bool: ...
    def _perturb(self, ctx: StepContext) -> None: ...
    def _close_perturbed(self, ctx: StepContext) -> bool: ...
    def _descend(self, ctx: StepContext) -> None: ...
    def zero_grad(self, set_to_none: bool = True) -> None: ...
    def perturbed_pass(self) -> ContextManager[Any]: ...


def _add(sums: dict[Tensor, Tensor], key: Tensor, value: Tensor, steal: bool) -> None:
    if key in sums:
        sums[key].add_(value)
    else:
        sums[key] = value if steal else value.clone()


class ShardSum:
    """Per-parameter sums of the chunks' gradients (perturbed ones when the
    step perturbs), kept clean gradients and the method's ``shard_state``.
    The sum takes over the first chunk's ``.grad`` tensors, so it costs one
    copy of the parameters beyond a plain step."""

    def __init__(self, state_keys: Iterable[str]) -> None:
        self.grads: dict[Tensor, Tensor] = {}
        self.clean: dict[Tensor, Tensor] | None = None
        self.state: dict[str, dict[Tensor, Tensor]] = {key: {} for key in state_keys}
        self.extra: dict[str, Any] = {}  # the decision's notes, from the first chunk
        self.perturbed = False
        self._grad_sq: list[Tensor] | None = None

    @torch.no_grad()
    def add(self, ctx: StepContext) -> None:
        """Add one chunk, whose gradients are in ``.grad``."""
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
        """Write the mean gradients into ``.grad`` and return the step's views
        (a parameter without a gradient in some chunks counts zero there)."""
        views = []
        for group in param_groups:
            params = [p for p in group["params"] if p in self.grads]
            for p in params:
                p.grad = self.grads[p].div_(n)
            view = GroupView(group, params, [p.grad for p in params])
            if self.clean is not None:
                view.clean = [self.clean[p].div_(n) if p in self.clean else torch.zeros_like(p) for p in params]
            views.append(view)
        self.grads, self.clean = {}, None
        return views

    def mean_state(self, n: int) -> dict[str, Any]:
        means = {key: {p: s.div_(n) for p, s in sums.items()} for key, sums in self.state.items()}
        return {**self.extra, **means}

    def grad_sq(self, n: int) -> list[Tensor]:
        """The mean over chunks of each group's ``||g_i||^2``."""
        assert self._grad_sq is not None
        return [s / n for s in self._grad_sq]


def chunked_step(opt: Protocol, closure: Callable[[int], Any], n: int, scaler: Any) -> Any:
    """Every chunk's clean and perturbed passes in turn, then one descent
    along the chunks' means."""
    group = opt._replicas().chunk_group()
    scaling = ScaledPasses(scaler) if enabled(scaler) else None
    opt._scaler = scaler if scaling is not None else None
    losses: list[Any] = []
    try:
        decided: bool | None = None
        extra: dict[str, Any] = {}
        if opt.decides_from_gradient:
            # The decision needs the batch gradient: one clean sweep first.
            sums = _sweep(opt, closure, n, scaler, group, scaling, losses, perturb=False)
            if sums is None:
                return _mean(losses)
            ctx = _chunk_mean(opt, sums, n, group, perturbed=False)
            if not opt._decide(ctx):
                opt._descend(ctx)
                return _mean(losses)
            decided, extra, losses = True, ctx.extra, []
        sums = _sweep(opt, closure, n, scaler, group, scaling, losses, perturb=decided)
        if sums is None:
            return _mean(losses)
        ctx = _chunk_mean(opt, sums, n, group, perturbed=sums.perturbed)
        ctx.extra = {**extra, **ctx.extra}
        opt._descend(ctx)
        return _mean(losses)
    except BaseException:
        if scaling is not None:
            scaling.forget()  # an abandoned step leaves the scaler as it was
        raise
    finally:
        opt._scaler = None
        if scaling is not None:
            scaling.update()


def pre_pass_step(opt: Any, closure: Callable[..., Any], n: int | None, scaler: Any) -> Any:
    """The step of a pre-pass method (Momentum-SAM): ``eps`` from its state,
    then its only pass at ``w + eps`` (or at ``w`` when it does not perturb),
    kept whole: its running statistics included. With ``n`` chunks every
    chunk runs at the same ``w + eps`` (``eps`` does not come from a
    gradient) and the step descends along their mean, averaged over DDP
    replicas too (the chunks run under ``no_sync``)."""
    opt._scaler, opt._data = (scaler if enabled(scaler) else None), {}
    try:
        perturbed = opt.first_step(zero_grad=True, scaler=scaler)
        try:
            which = "perturbed" if perturbed else "clean"
            if n is None:
                loss = opt._run_closure(closure, which)
            else:
                loss = _accumulate(opt, closure, n, which)
        except BaseException:
            opt.cancel_step()
            raise
        opt.second_step()
        return loss
    finally:
        opt._scaler, opt._data = None, {}


def _accumulate(opt: Any, closure: Callable[[int], Any], n: int, which: str) -> Any:
    """Every chunk's pass in turn; the mean gradient left in ``.grad``."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sums: dict[Tensor, Tensor] = {}
    losses: list[Any] = []
    local = opt._replicas().chunk_pass()
    for i in range(n):
        with local():
            losses.append(opt._run_closure(partial(closure, i), which))
        for p in params:
            if p.grad is not None:
                _add(sums, p, p.grad, steal=True)
                p.grad = None  # the next chunk's backward must not add into the sum
    for p, total in sums.items():
        p.grad = total.div_(n)
    group = opt._replicas().chunk_group(own_eps=False)
    if group is not None:
        grads = [p.grad for p in params if p.grad is not None]
        all_reduce_mean_(grads, group, grads[0].device if grads else torch.device("cpu"))
    return _mean(losses)


def _sweep(
    opt: Protocol, closure: Callable[[int], Any], n: int, scaler: Any, group: Any,
    scaling: ScaledPasses | None, losses: list[Any], perturb: bool | None,
) -> ShardSum | None:
    """Run every chunk (clean pass, and the perturbed pass when the method
    perturbs: ``perturb``, or its own choice at the first chunk) and sum the
    results; None when a non-finite gradient skipped the step."""
    local = opt._replicas().chunk_pass()
    sums = ShardSum(opt.shard_state)
    for i in range(n):
        chunk = partial(closure, i)
        with local():
            losses.append(opt._run_closure(chunk, "clean"))
        with torch.no_grad():
            ctx = opt._open(scaler, group, scaling)
            ctx.chunked = True
            if not opt._finite(ctx, ctx.grad_sq, every_rank=True):
                opt._count_skip("clean")
                return None
            if perturb is None:
                perturb = opt._decide(ctx)
                sums.extra = ctx.extra  # the decision's own notes (committed after the step)
            if perturb:
                opt._perturb(ctx)
                opt.zero_grad()
        if perturb:
            try:
                with local(), opt.perturbed_pass():
                    opt._run_closure(chunk, "perturbed")
            except BaseException:
                with torch.no_grad():
                    views.restore(ctx)
                raise
            with torch.no_grad():
                if not opt._close_perturbed(ctx):
                    return None
        sums.add(ctx)
    return sums


@torch.no_grad()
def _chunk_mean(opt: Protocol, sums: ShardSum, n: int, group: Any, perturbed: bool) -> StepContext:
    """The step's context from the chunks' sums (averaged over replicas too)."""
    groups = sums.mean_views(opt.param_groups, n)
    ctx = StepContext(groups, views.use_foreach(opt.foreach, groups), sums.grad_sq(n), perturbed=perturbed, group=group, chunked=True)
    ctx.extra = sums.mean_state(n)
    if group is not None:
        opt._replicas().average_shards(ctx, True, opt.keeps_clean_grad, opt.shard_state)
    else:
        shard_norms(ctx)
    return ctx


def _mean(losses: list[Any]) -> Any:
    """Mean of the chunks' losses (tensors detached: the graphs are gone)."""
    if not losses or any(x is None for x in losses):
        return None
    if all(isinstance(x, Tensor) for x in losses):
        return torch.stack([x.detach() for x in losses]).mean()
    return sum(float(x) for x in losses) / len(losses)
