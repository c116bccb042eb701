"""The sharpness-aware protocol, written once.

A step of every method in this package is::

    open      gradients of the clean pass in .grad (unscaled under a GradScaler)
    decide    the schedule (and the combine) choose whether to perturb
    perturb   the ascent chain turns g into v; eps = radius * finish(v) / (||v|| + eps0),
              ||v|| global over every group; w <- w + eps
    pass      the perturbed forward and backward: g_p at w + eps
    restore   w comes back exactly (re-pointed or copied, never w + eps - eps)
    combine   the direction d from g and g_p, written into .grad
    descend   clip d, the base optimizer steps, post-step terms and state commits

A pre-pass ascent (Momentum-SAM) knows ``eps`` before any pass: its step
is decide, perturb, one pass at ``w + eps``, restore, combine, descend.

What the method is lives in its parts (``_parts``); replicas, the
GradScaler, the base optimizer and m-sharpness chunks have rooms of their
own (docs/architecture.md). A non-finite value in either pass skips the
whole step: weights, base state and method state stay exactly as they were.
Memory: ``w + eps`` is built in the clean gradient's buffer, which the
parameters point at during the perturbed pass (or ``w`` is copied aside):
one extra copy of the parameters at the step's peak, none between steps.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import nullcontext
from typing import Any, ClassVar, ContextManager

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _declare, _deferred as D, _options, _sharding as S, _stacks, passes as P, _tensorops as T, _validate as V, _views as views
from ._chunks import chunked_step, pre_pass_step
from ._context import GroupView, StepContext, total
from ._parts import Always, Ascent, Combine, Descend, Plain, Schedule
from ._replicas import Replicas
from ._scaling import ScaledPasses, enabled
from ._skips import SkipLog
from ._wrapping import Wrapped

__all__ = ["GroupView", "SharpnessAware", "StepContext", "total"]


class SharpnessAware(Wrapped):
    """Base class of every method: the protocol, driven by its parts. A method
    is a subclass naming them (``class SAM(SharpnessAware): ascent =
    (Centralize(), Adaptive())``; docs/composition.md, :func:`flatminima.compose`)."""

    ascent: ClassVar[tuple[Ascent, ...]] = (Plain(),)
    combine: ClassVar[Combine] = Descend()
    schedule: ClassVar[Schedule] = Always()
    #: option defaults of this method that differ from its parts' (FisherSAM: rho=0.1)
    option_defaults: ClassVar[dict[str, Any]] = {}
    # derived from the parts by _declare.declare (read-only summaries)
    wide_options: ClassVar[dict[str, _options.Option]] = {}
    keeps_clean_grad: ClassVar[bool] = False
    decides_from_gradient: ClassVar[bool] = False
    pre_pass: ClassVar[bool] = False
    shard_state: ClassVar[tuple[str, ...]] = ()
    # the protocol's own options (_options.PROTOCOL), set by the constructor
    model: torch.nn.Module | None
    foreach: bool | None
    max_grad_norm: float | None
    sync_perturbations: bool

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _declare.declare(cls)  # options, signature, docs and flags from the parts

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        **kwargs: Any,
    ) -> None:
        group, wide, base_kwargs = _declare.split_options(type(self), kwargs)
        for name, value in wide.items():
            setattr(self, name, value)
        if self.model is not None and not isinstance(self.model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        self._phase: str | None = None  # None | "perturbed" | "unperturbed" | "skipped"
        self._pending: StepContext | None = None
        self._scaler: Any = None  # the GradScaler of the step(closure) call under way
        self._defer = False  # inside step(closure): the clean finite check may wait (_deferred)
        self._data: dict[str, Any] = {}  # what the closure noted for the step under way
        self._skips = SkipLog(type(self).__name__, lambda: self.param_groups)
        self._wrap(params, base_optimizer, group, base_kwargs)
        if any(part.counts_steps for part in self.parts()):
            self.method_state["step"] = 0  # steps taken: one counter for every part that reads it
        for part in self.parts():
            part.init(self)

    @classmethod
    def parts(cls) -> tuple[Any, ...]:
        return (*cls.ascent, cls.combine, cls.schedule)  # the order their hooks run in

    def _check_group(self, group: Any) -> None:
        super()._check_group(group)
        for part in self.parts():
            part.check_group(group)

    # ------------------------------------------------------------------ the explicit API
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Climb to ``w + eps`` from the gradients of the clean pass.

        True: run the perturbed pass (forward and backward at ``w + eps``),
        then :meth:`second_step`; False (no perturbed pass, or a non-finite
        clean gradient): :meth:`second_step` straight away; the gradients
        leave ``.grad`` (None until second_step() puts them back), so a pass
        run in between (the popular snippet always runs one) changes nothing.
        ``zero_grad=True`` sets the gradients to None after a perturbation.
        A pre-pass method (Momentum-SAM) is called *before* its only
        backward (docs/methods/momentum_sam.md).
        ``scaler``: the ``torch.amp.GradScaler`` of the backward;
        :meth:`second_step` calls ``scaler.update()`` once (not you).
        """
        if self._phase is not None:
            raise ValueError(
                "first_step() called twice: call second_step() (or cancel_step()) before the next first_step()"
            )
        ctx = self._open(scaler, None if self.pre_pass else self._replicas().per_replica_group())
        try:
            if self.pre_pass:  # its only backward comes next: what .grad holds is older
                views.set_aside(ctx, self.param_groups)
                phase = "perturbed" if self._decide(ctx) and self._prepare(ctx) else "unperturbed"
            elif not (any(v.params for v in ctx.groups) or self._may_lack_clean_grad()):
                raise views.no_clean_grad(type(self).__name__)
            else:  # step(closure) may read the clean verdict with the perturbed one (_deferred)
                phase = D.clean_phase(self, ctx, self._defer)
            if phase == "perturbed":
                ctx.aside = None  # a pre-pass step's: stale at w + eps
                self._perturb(ctx)
            elif not self.pre_pass:  # after decide: under DDP it averages .grad in place
                views.set_aside(ctx, self.param_groups)
        except BaseException:
            self._abandon(ctx)  # a hook raised: w and the scaler as they were
            raise
        self._phase, self._pending = phase, ctx
        if zero_grad and phase == "perturbed":
            self.zero_grad()
        return phase == "perturbed"

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Come back to ``w`` and take the base optimizer's step with the
        perturbed pass's gradients in ``.grad``, or, when first_step() returned
        False, the clean ones it set aside (what a pass wrote since is dropped).
        A non-finite gradient in either pass skips the whole step (counted in
        :attr:`skipped_steps`)."""
        if self._phase is None:
            raise ValueError("second_step() called before first_step()")
        phase, ctx = self._phase, self._pending
        assert ctx is not None
        self._phase, self._pending = None, None
        try:
            if phase != "perturbed" and not self.pre_pass:
                views.put_back(ctx, self.param_groups)
            if phase == "skipped":
                self._count_skip("clean")
                return
            if phase == "perturbed":
                if not self._close_perturbed(ctx):
                    return
                if ctx.group is not None:
                    self._replicas().average_shards(ctx, False, self.keeps_clean_grad, self.shard_state)
            elif self.pre_pass:
                views.reread_pre_pass(ctx, self.param_groups, type(self).__name__)
                if not self._read_pass(ctx, clean=True):
                    return
            self._descend(ctx)
        finally:
            if ctx.scaling is not None:
                ctx.scaling.update()
            if zero_grad:
                self.zero_grad()

    def cancel_step(self) -> None:
        """Abandon a step between first_step() and second_step(): ``w`` restored
        exactly, every state (the GradScaler's too) untouched. No-op without one."""
        ctx, self._phase, self._pending = self._pending, None, None
        if ctx is not None:
            self._abandon(ctx)

    # ------------------------------------------------------------------ step(closure)
    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Any] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        chunks: int | None = None,
    ) -> Any:
        """One full step. ``closure`` zeroes the gradients, runs forward and
        backward and returns the loss (do not call ``backward`` before
        ``step``); it runs for the clean pass and, when the method needs it,
        at ``w + eps``. Returns the clean loss (a pre-pass method's one pass is
        at ``w + eps``). The closure may hand values to the step (:meth:`note`).

        Args:
            closure: zero the gradients, forward, backward, return the loss; a
                loop over micro-batches in it gives gradient accumulation.
            scaler: a ``torch.amp.GradScaler`` (fp16): the closure calls
                ``scaler.scale(loss).backward()``; each pass is unscaled, an
                inf/NaN in either skips the step, ``update()`` runs once.
            chunks: m-sharpness: ``closure(i)`` runs chunk ``i``; each chunk
                gets its own ``eps``, the step descends along their mean (one
                more copy of the parameters). Returns the mean clean loss.
        """
        closure = _stacks.check_step_call(type(self).__name__, closure)
        on = enabled(scaler)  # type check before any pass runs
        if self._phase is not None:
            raise ValueError("step() called between first_step() and second_step(); finish that step first")
        n = None if chunks is None else V.positive_int("chunks", chunks)
        if self.pre_pass:  # one pass, whose running statistics are kept: there is no other
            return pre_pass_step(self, closure, n, scaler)
        if n is not None:
            return chunked_step(self, closure, n, scaler)
        self._scaler, self._data, self._defer = (scaler if on else None), {}, True
        try:
            with self._replicas().local_pass():
                loss = self._run_closure(closure, "clean")
            if self.first_step(zero_grad=True, scaler=scaler):  # .grad held eps: a pass without backward is caught
                try:
                    with self.perturbed_pass():
                        self._run_closure(closure, "perturbed")
                except BaseException:
                    self.cancel_step()
                    raise
            self.second_step()
        finally:
            self._scaler, self._data, self._defer = None, {}, False
        return loss

    def note(self, **values: Any) -> None:
        """From inside a closure: hand ``values`` to the step under way (its
        parts read them in ``ctx.data``); ESAM's per-sample losses travel so."""
        self._data.update(values)

    def clean_pass(self) -> ContextManager[Any]:
        """Context for the clean forward and backward of the explicit API:
        under DDP with per-replica perturbations (the default), the DDP
        module's ``no_sync()``; elsewhere it does nothing. ``step(closure)``
        uses it by itself. A pre-pass method has no clean pass: nothing here."""
        return nullcontext() if self.pre_pass else self._replicas().local_pass()

    def perturbed_pass(self) -> ContextManager[Any]:
        """Context for the perturbed pass: with ``model=`` given, running
        statistics (BatchNorm and any ``running_*`` buffer) are restored after
        it, so they come from the clean pass alone."""
        return nullcontext() if self.model is None else P.preserve_running_stats(self.model)

    def _run_closure(self, closure: Callable[..., Any], which: str) -> Any:
        """One pass of :meth:`step` (``which``: "clean" or "perturbed"); it
        must leave that point's gradients in ``.grad``."""
        with torch.enable_grad():
            return closure()

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled when ``step`` was given a GradScaler."""
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()

    # ------------------------------------------------------------------ the protocol
    def _replicas(self) -> Replicas:
        return Replicas(self.model, self.sync_perturbations, self._shards)

    def _open(self, scaler: Any, group: Any, scaling: ScaledPasses | None = None) -> StepContext:
        """The context of a step (or chunk) from the gradients now in ``.grad``."""
        for g in self.param_groups:  # a value set by hand since (rho = nan, say) is refused before it is used
            Wrapped._check_group(self, g)
        groups = views.collect(self.param_groups, type(self).__name__)  # refuses sparse gradients
        groups = [] if self.pre_pass else groups  # a pre-pass step's v comes from state (_prepare)
        fe = views.use_foreach(self.foreach, groups)
        ctx = StepContext(groups, fe, [], group=group, data=self._data, shards=self._shards)
        if enabled(scaler):
            S.refuse_scaler(self._shards)
            ctx.scaling = scaling or ScaledPasses(scaler)  # type: ignore[arg-type]
            if not self.pre_pass:  # nothing to unscale before the one pass
                ctx.scaling.unscale([p for v in groups for p in v.params])
        ctx.grad_sq = S.squares(ctx, [v.grads for v in groups])
        return ctx

    def _finite(self, ctx: StepContext, squares: list[Tensor], every_rank: bool) -> bool:
        """Whether the step's gradients, whose squared norms are ``squares``, are finite (on every
        rank with ``every_rank``); a GradScaler hears of one its own check missed. A float32 sum of
        squares overflows from |g| ~ 1e19 on: then it is taken again in float64 (in place)."""
        value = total(squares)
        finite = T.is_finite(value)
        if not finite and len(squares) == len(ctx.groups):
            squares[:] = S.squares(ctx, [v.grads for v in ctx.groups], torch.float64)
            value = total(squares)
            finite = T.is_finite(value)
        if every_rank:
            finite = Replicas.agree(finite, ctx, value.device)
        if not finite and ctx.scaling is not None:
            ctx.scaling.record_inf(value.device)
        return finite

    def _decide(self, ctx: StepContext) -> bool:
        """The schedule's choice, then the combine's veto (both always asked)."""
        wanted = self.schedule.decide(self, ctx)
        return self.combine.wants(self, ctx) and wanted

    def _prepare(self, ctx: StepContext) -> bool:
        """A pre-pass ascent's ``v`` from state, in fresh buffers (False: nothing to perturb)."""
        ok, ctx.foreach = self.ascent[0].prepare(self, ctx), views.use_foreach(self.foreach, ctx.groups)
        ctx.grad_sq = S.squares(ctx, [v.grads for v in ctx.groups])
        return ok

    def _perturb(self, ctx: StepContext) -> None:
        """The ascent chain, the global norm, the radius, ``w <- w + eps``."""
        groups, fe = ctx.groups, ctx.foreach
        if self.keeps_clean_grad:
            for v in groups:
                v.clean = T.clone(v.grads, fe)
        swap = fe and T.can_swap([p for v in groups for p in v.params], [g for v in groups for g in v.grads])
        scratch = [views.scratch([a.needs_scratch(v) for a in self.ascent], v, swap) for v in groups]
        ascent_sq: list[Any] = []  # per group: v's tensors when a part changed it, else ||g||^2
        for v, s, g_sq in zip(groups, scratch, ctx.grad_sq):
            changed = False
            for part, buffer in zip(self.ascent, s):
                changed = part.vector(self, ctx, v, buffer) or changed
            ascent_sq.append(v.grads if changed else g_sq)
        norm = total(S.squares(ctx, ascent_sq)).sqrt()
        for v, s in zip(groups, scratch):
            radius = self.combine.radius(self, ctx, v, v.group["rho"])
            for part, buffer in reversed(list(zip(self.ascent, s))):
                part.finish(self, ctx, v, buffer)
            for part in self.ascent:
                radius = part.radius(self, ctx, v, radius)
            views.step_out(v, radius / (norm + v.group["norm_eps"]), swap, s, fe)
        ctx.perturbed = True

    def _close_perturbed(self, ctx: StepContext) -> bool:
        """After the perturbed pass: restore ``w``, read ``g_p`` (unscaled) and
        check it; False (the step counted as skipped) when it is non-finite."""
        views.restore(ctx)
        views.refresh(ctx, self.param_groups, type(self).__name__)
        if not any(v.params for v in ctx.groups):
            raise ValueError(
                f"{type(self).__name__}: the perturbed pass left no gradient in .grad; it must run the "
                "forward and backward at w + eps (a closure that only returns the loss, or an "
                "optimizer.step() after a single manual backward, would descend along eps)"
            )
        return self._read_pass(ctx, clean=False)

    def _read_pass(self, ctx: StepContext, clean: bool) -> bool:
        """The pass now in the views: unscaled, its norms taken and checked; False: counted as skipped."""
        if ctx.scaling is not None:
            ctx.scaling.unscale([p for v in ctx.groups for p in v.params])
        squares = S.squares(ctx, [v.grads for v in ctx.groups])
        ctx.grad_sq, ctx.perturbed_sq = (squares, ctx.perturbed_sq) if clean else (ctx.grad_sq, squares)
        # DDP averaged this pass (every rank has it) unless chunks ran it locally
        deferred, ctx.clean_total = ctx.clean_total, None
        verdict = None if deferred is None else D.settle(deferred, squares)  # both passes, one read
        if verdict == "finite" or (verdict is None and self._finite(ctx, squares, every_rank=ctx.chunked)):
            return True
        self._count_skip("clean" if clean or verdict == "clean" else "perturbed")
        return False

    def _may_lack_clean_grad(self) -> bool:  # whether a clean pass may leave no gradient (ESAM: a mask)
        return False

    @torch.no_grad()
    def _descend(self, ctx: StepContext) -> None:
        """Combine, clip, the base optimizer's step and the post-step terms."""
        if ctx.perturbed:
            self.combine.combine(self, ctx)
            self.counters["perturbed_steps"] += 1
        else:
            self.combine.combine_unperturbed(self, ctx)
        views.clip(ctx, self.max_grad_norm)
        self.base_optimizer.step()
        for part in self.parts():
            part.post_step(self, ctx)
        if "step" in self.method_state:
            self.method_state["step"] += 1
        self.counters["steps"] += 1
        self._skips.taken()
        self._opt_called = True  # LR schedulers check that the optimizer stepped

    @torch.no_grad()
    def _abandon(self, ctx: StepContext) -> None:
        views.restore(ctx)  # the groups perturbed so far
        views.put_back(ctx, self.param_groups)  # a step without eps: .grad as it was
        if ctx.scaling is not None:
            ctx.scaling.forget()

    def _count_skip(self, where: str) -> None:
        self._skips.skipped(where)
        self.counters["skipped_steps"] += 1

    def _between_steps(self, what: str) -> None:
        if self._phase is not None and what:
            raise ValueError(f"{what} called between first_step() and second_step(); save between steps")
        self.cancel_step()  # a no-op between steps
