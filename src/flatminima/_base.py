"""The two-pass sharpness-aware protocol, written once.

A step of every method in this package is:

1. clean pass: loss and gradient ``g`` at ``w`` (the caller's backward);
2. ascent: each group turns its gradients into an ascent vector ``v``
   (``_ascent_vector``), the global norm ``||v||`` is taken over every group,
   the vector is finished (``_ascent_finish``) and scaled to
   ``eps = rho * v / (||v|| + eps0)``; ``w`` is saved and ``w <- w + eps``;
3. perturbed pass: gradient ``g_p`` at ``w + eps`` (the caller's backward);
4. ``w`` is restored by *copying* the saved values (``w + eps - eps`` is not
   ``w`` in floating point);
5. ``_combine`` writes the descent direction ``d`` into ``.grad`` (SAM:
   ``d = g_p``), it is optionally clipped by global norm, the base optimizer
   steps, and ``_post_step`` adds any extra term and commits the method's
   own state.

Variants override only those hooks. The base class owns the loop, the saved
weights, the non-finite checks, clipping, the shared parameter groups and
the state dict.

Memory: on the fast path ``w + eps`` is built in the clean gradient's
buffer and the parameters point at it during the perturbed pass (their own
storage, untouched, is ``w`` again afterwards); on the reference path ``w``
is copied into a scratch buffer and ``eps`` added in place. Either way a
plain step holds one extra copy of the parameters at its peak (the
perturbed backward's gradients next to ``w`` and ``w + eps``) and none
between steps. A method whose ``_combine`` needs the clean gradient sets
``keeps_clean_grad`` and pays one more copy during the step (it says so in
its docstring).

Around the passes: a GradScaler (``scaler=``) is unscaled per pass and
updated once per step; under DDP (``model=`` the DDP module) the clean pass
is local to each replica and what a method computed from it is averaged
over the replicas; ``chunks=`` runs the same per-shard protocol over chunks
of one batch (m-sharpness). See docs/training.md.

``step(closure)`` runs each pass through ``_run_closure``; a method whose
closure has another form (ESAM's per-sample losses) overrides that one hook.

Rule for variant authors: hooks that run before the perturbed pass must not
mutate the method's persistent state — a non-finite perturbed gradient
skips the step, and the state must then be exactly as before. Commit state
in ``_post_step``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from typing import Any, ClassVar, ContextManager

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from . import passes as P
from ._context import GroupView, StepContext, total
from ._shards import ChunkedSteps

__all__ = ["GroupView", "SharpnessAware", "StepContext", "total"]

_FORMAT = 1


class SharpnessAware(ChunkedSteps, Optimizer):
    """Base class of every two-pass method; see the module docstring.

    Subclasses pass their per-group defaults and a validator per key, and
    override the hooks they need. Users construct subclasses, not this.
    """

    #: whether ``_combine``/``_post_step`` need the clean gradient ``g`` (+1 copy during the step)
    keeps_clean_grad: ClassVar[bool] = False
    #: key -> validator for the method's per-group hyperparameters
    group_checks: ClassVar[Mapping[str, Callable[[str, Any], Any]]] = {}
    #: whether ``_perturb_this_step`` reads the gradient (then, with per-shard
    #: eps, it decides from the shards' mean gradient)
    decides_from_gradient: ClassVar[bool] = False
    #: method-wide options (attributes set by the constructor, beyond the
    #: param groups): saved by ``state_dict`` and restored by
    #: ``load_state_dict``, as param-group hyperparameters are
    method_options: ClassVar[tuple[str, ...]] = ("max_grad_norm", "sync_perturbations")
    #: keys of ``ctx.extra`` holding ``{param: Tensor}`` computed from a
    #: shard's own gradient and committed in ``_post_step``: averaged over
    #: the shards (replicas, chunks) before ``_combine``, as the gradient is
    shard_state: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        *,
        model: torch.nn.Module | None = None,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        sync_perturbations: bool = False,
        **base_kwargs: Any,
    ) -> None:
        self.max_grad_norm = V.optional_positive("max_grad_norm", max_grad_norm)
        #: under DDP: average the clean gradient too (one global eps) instead of one eps per replica
        self.sync_perturbations = V.flag("sync_perturbations", sync_perturbations)
        self._scaler: Any = None  # the GradScaler of the step(closure) call under way
        self.foreach = V.optional_flag("foreach", foreach)
        if model is not None and not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self._method_defaults = dict(defaults)
        for key, value in defaults.items():
            self._check_value(key, value)

        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, got a single Tensor")
        params = list(params)
        is_class = isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)
        if isinstance(base_optimizer, SharpnessAware) or (is_class and issubclass(base_optimizer, SharpnessAware)):
            raise TypeError(f"base_optimizer must be an ordinary optimizer, not the sharpness-aware {base_optimizer!r}")
        if not is_class and not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
        if not is_class and base_kwargs:
            raise TypeError(
                f"base optimizer keyword arguments {sorted(base_kwargs)} were given with an optimizer "
                "instance; set them when building the instance, or pass its class instead"
            )

        super().__init__(params, dict(defaults))

        base_cls = base_optimizer if is_class else type(base_optimizer)
        if is_class:
            self.base_optimizer = base_optimizer(self.param_groups, **base_kwargs)
        else:
            self.base_optimizer = base_optimizer
        # Both optimizers read one dict per group: a key both define would
        # silently set the other's option (Adadelta's rho, RMSprop's alpha).
        shared = sorted(set(self._method_defaults) & set(self.base_optimizer.defaults))
        if shared:
            raise ValueError(
                f"{type(self).__name__} cannot wrap {base_cls.__name__}: both use the param-group "
                f"option(s) {shared}, and the two optimizers share their param groups"
            )
        if not is_class:
            self._adopt_instance_groups(params)
        # One list of group dicts, shared: LR schedulers, per-group rho and
        # add_param_group act on both optimizers at once.
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = {**self.base_optimizer.defaults, **self._method_defaults}
        for group in self.param_groups:
            self._check_group(group)

        self._phase: str | None = None  # None | "perturbed" | "unperturbed" | "skipped"
        self._pending: StepContext | None = None
        self._warned_skip = False
        self.counters: dict[str, int] = {"steps": 0, "perturbed_steps": 0, "skipped_steps": 0}
        #: method-level (not per-parameter) state, saved in the state dict
        self.method_state: dict[str, Any] = {}

    # ------------------------------------------------------------------ groups
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_value(self, key: str, value: Any) -> None:
        check = self.group_checks.get(key)
        if check is not None:
            check(key, value)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        for key in self._method_defaults:
            self._check_value(key, group[key])

    def _adopt_instance_groups(self, user_params: list[Any]) -> None:
        """Put our hyperparameters into an existing optimizer's groups."""
        ours = {id(p) for p in self._all_params()}
        theirs = {id(p) for g in self.base_optimizer.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError(
                "base_optimizer instance does not hold the same parameters as `params`: "
                f"{len(ours - theirs)} given parameter(s) are not in it and {len(theirs - ours)} of its "
                "parameter(s) were not given"
            )
        for group in self.base_optimizer.param_groups:
            for key, value in self._method_defaults.items():
                group.setdefault(key, value)
        for user_group in user_params:
            if not isinstance(user_group, dict):
                continue
            options = {k: v for k, v in user_group.items() if k != "params"}
            ids = {id(p) for p in _as_list(user_group["params"])}
            match = [g for g in self.base_optimizer.param_groups if {id(p) for p in g["params"]} == ids]
            if not match:
                raise ValueError(
                    f"param group with options {sorted(options)} does not match any param group "
                    "of the base_optimizer instance"
                )
            match[0].update(options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params", [])
        if not isinstance(params, (Tensor, list, tuple, set)):
            params = param_group["params"] = list(params)  # a generator: read it once
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        if "base_optimizer" not in self.__dict__:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self._method_defaults.items():
            param_group.setdefault(key, value)
        self._check_group(param_group)
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    # ------------------------------------------------------------------ hooks
    def _perturb_this_step(self, ctx: StepContext) -> bool:
        """Whether this step needs the perturbed pass (after the clean pass)."""
        return True

    def _radius(self, ctx: StepContext, view: GroupView) -> float | Tensor:
        """The radius ``rho`` of this group's perturbation at this step."""
        return view.group["rho"]

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        """Turn ``view.grads`` into the ascent vector ``v`` in place.

        Return False when ``v`` is ``g`` itself (then ``||g||`` is reused).
        ``scratch`` is a parameter-sized buffer free until ``_ascent_finish``
        returns.
        """
        return False

    def _ascent_finish(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        """Map ``v`` (in ``view.grads``) to the unscaled perturbation direction."""

    def _combine(self, ctx: StepContext) -> None:
        """Write the descent direction into ``view.grads`` (``g_p`` on entry)."""

    def _combine_unperturbed(self, ctx: StepContext) -> None:
        """Direction for steps without a perturbed pass (``g`` on entry)."""

    def _post_step(self, ctx: StepContext) -> None:
        """After the base step: extra update terms and commits of method state."""

    # ------------------------------------------------------------------ the protocol
    def _use_foreach(self, groups: list[GroupView]) -> bool:
        if self.foreach is not None:
            return self.foreach
        # torch._foreach_* kernels need plain dense tensors (not DTensor & co).
        return all(type(p) in (Tensor, torch.nn.Parameter) for v in groups for p in v.params)

    def _collect(self) -> list[GroupView]:
        views = []
        for group in self.param_groups:
            params, grads = [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                self._check_dense(p.grad)
                params.append(p)
                grads.append(p.grad)
            views.append(GroupView(group, params, grads))
        return views

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False, *, scaler: torch.amp.GradScaler | None = None) -> bool:
        """Climb to ``w + eps`` from the gradients of the clean pass.

        Returns True when the caller must now run the perturbed pass
        (forward and backward at ``w + eps``) and then call
        :meth:`second_step`; False when this step needs no perturbed pass
        (the method skips it, or the clean gradient was non-finite): call
        :meth:`second_step` straight away. With ``zero_grad=True`` the
        gradients are set to None after a perturbation (``.grad`` holds
        ``eps`` by then, the clean gradient having been consumed).

        ``scaler``: the ``torch.amp.GradScaler`` that scaled the clean
        backward (``scaler.scale(loss).backward()``). The gradients are
        unscaled here, the perturbed pass's in :meth:`second_step`, which
        also calls ``scaler.update()`` once: do not call ``scaler.step`` or
        ``scaler.update`` yourself.
        """
        if self._phase is not None:
            raise ValueError(
                "first_step() called twice: call second_step() (or cancel_step()) before the next first_step()"
            )
        ctx = self._open(scaler, self._replica_group())
        try:
            if not self._finite(ctx, ctx.grad_sq, every_rank=True):
                phase = "skipped"
                self._note_skip("clean")
            elif not self._decide(ctx):
                phase = "unperturbed"
            else:
                self._perturb(ctx)
                phase = "perturbed"
        except BaseException:
            self._abandon(ctx)  # a hook raised: w and the scaler as they were
            raise
        self._phase, self._pending = phase, ctx
        if zero_grad and phase == "perturbed":
            self.zero_grad()
        return phase == "perturbed"

    def _open(self, scaler: Any, group: Any, scaler_views: list[object] | None = None) -> StepContext:
        """The context of a step (or chunk) from the gradients now in ``.grad``,
        unscaled first when a GradScaler is in use."""
        groups = self._collect()
        fe = self._use_foreach(groups)
        ctx = StepContext(groups, fe, [], group=group)
        if P.scaler_enabled(scaler):
            ctx.scaler = scaler
            ctx.scaler_views = [] if scaler_views is None else scaler_views
            P.unscale_pass(scaler, [p for v in groups for p in v.params], ctx.scaler_views)
        ctx.grad_sq = [T.sum_of_squares(v.grads, fe) for v in groups]
        return ctx

    def _finite(self, ctx: StepContext, squares: list[Tensor], every_rank: bool) -> bool:
        """Whether the gradients whose squared norms are ``squares`` are finite.
        With ``every_rank`` and per-replica gradients, on every rank: the
        ranks must skip together. A GradScaler hears of a non-finite value
        its own check missed, so that it backs off as for an inf."""
        value = total(squares)
        finite = T.is_finite(value)
        if every_rank and ctx.group is not None:
            finite = P.all_ranks_true(finite, ctx.group, value.device)
        if not finite and ctx.scaler is not None:
            P.record_inf(ctx.scaler, ctx.scaler_views, value.device)
        return finite

    def _decide(self, ctx: StepContext) -> bool:
        """``_perturb_this_step``, with per-replica gradients made consistent:
        a step without a perturbed pass descends along the replicas' mean
        gradient, and a method that decides from the gradient decides from
        that mean (then perturbs from its own replica's gradient)."""
        if ctx.group is None or ctx.chunked:
            return self._perturb_this_step(ctx)
        if not self.decides_from_gradient:
            if self._perturb_this_step(ctx):
                return True
            self._average_grads(ctx)
            return False
        fe = ctx.foreach
        local = {p: g for v in ctx.groups for p, g in zip(v.params, T.clone(v.grads, fe))}
        self._average_grads(ctx)  # may add zero gradients (parameters unused on this rank)
        if not self._perturb_this_step(ctx):
            return False
        for v in ctx.groups:
            own = [(g, local[p]) for p, g in zip(v.params, v.grads) if p in local]
            T.copy_([g for g, _ in own], [c for _, c in own], fe)
            T.zero_([g for p, g in zip(v.params, v.grads) if p not in local], fe)  # no local gradient: eps 0
        ctx.grad_sq = [T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]
        return True

    def _average_grads(self, ctx: StepContext) -> None:
        """Average the replicas' clean gradients, as DDP would have: a
        parameter with a gradient on some ranks only counts zero on the
        others (DDP's ``find_unused_parameters``; one small collective
        agrees on which parameters have one)."""
        params = self._all_params()
        device = _device(ctx)
        anywhere = P.on_any_rank([p.grad is not None for p in params], ctx.group, device)
        missing = [p for p, there in zip(params, anywhere) if there and p.grad is None]
        for p in missing:
            p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
        if missing:
            for v in ctx.groups:
                v.params = [p for p in v.group["params"] if p.grad is not None]
                v.grads = [p.grad for p in v.params]
        P.all_reduce_mean_([g for v in ctx.groups for g in v.grads], ctx.group, device)
        ctx.grad_sq = [T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]

    def _perturb(self, ctx: StepContext) -> None:
        """The ascent and ``w <- w + eps``.

        Fast path (foreach, plain dense tensors): ``w + eps`` is computed in
        the gradient's own buffer, which the parameter then points at
        (``p.data``) for the perturbed pass; coming back points it at its
        own storage again. No buffer is allocated and ``w`` is neither
        copied nor written: one parameter-sized pass less than copying, two
        fewer than copy-and-restore. Otherwise (the per-tensor reference
        path, or tensors that may not be re-pointed) ``w`` is copied into a
        scratch buffer, ``eps`` added in place, and the copy put back after.
        """
        groups, fe = ctx.groups, ctx.foreach
        if self.keeps_clean_grad:
            for v in groups:
                v.clean = T.clone(v.grads, fe)
        swap = fe and T.can_swap([p for v in groups for p in v.params], [g for v in groups for g in v.grads])
        scratch = [
            [torch.empty_like(p, memory_format=torch.preserve_format) for p in v.params]
            if not swap or self._needs_scratch(v)
            else []
            for v in groups
        ]
        ascent_sq = []
        for v, s, g_sq in zip(groups, scratch, ctx.grad_sq):
            changed = self._ascent_vector(ctx, v, s)
            ascent_sq.append(T.sum_of_squares(v.grads, fe) if changed else g_sq)
        norm = total(ascent_sq).sqrt()
        # On the host the factor is read once (no device to wait for) and
        # folded into the add: w + c v in one pass over v instead of two.
        on_host = norm.device.type == "cpu"
        for v, s in zip(groups, scratch):
            self._ascent_finish(ctx, v, s)
            coef = self._radius(ctx, v) / (norm + v.group["norm_eps"])
            if on_host:
                coef = float(coef)
            else:
                T.mul_(v.grads, coef, fe)  # eps, without a device sync
                coef = 1.0
            if swap:
                # w + eps in the gradient's buffer (eps + w: the same bits)
                if on_host:
                    T.add_into_(v.grads, v.params, coef)
                else:
                    T.add_(v.grads, v.params, fe)
                v.saved = [p.data for p in v.params]
                for p, buf in zip(v.params, v.grads):
                    p.grad = None  # a zero_grad(set_to_none=False) must not zero the weights
                    p.data = buf
                v.swapped = True
            else:
                T.copy_(s, v.params, fe)
                T.add_(v.params, v.grads, fe, alpha=coef)
                v.saved = s
            # eps now lives in w: drop our references so that the closure's
            # zero_grad() frees these buffers before the perturbed backward
            # allocates new ones (else the step peaks at two extra copies).
            v.grads = []
        ctx.perturbed = True

    def _needs_scratch(self, view: GroupView) -> bool:
        """Whether ``_ascent_vector``/``_ascent_finish`` use the scratch buffer
        in this group (the ASAM operator keeps ``T_w`` there; ``adaptive``
        means it in every method). On the fast path the buffer is allocated
        only then."""
        return bool(view.group.get("adaptive", False))

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Come back to ``w`` and take the base optimizer's step.

        After a perturbation the gradients in ``.grad`` must be those of the
        perturbed pass. A non-finite gradient in either pass skips the whole
        step: weights and every optimizer state stay exactly as they were,
        and :attr:`skipped_steps` counts it. When first_step() returned False
        and a pass ran anyway (the popular snippet always runs the second
        pass), ``.grad`` re-bound by its ``zero_grad()`` is what the step
        uses, and it is checked for non-finite values as a second pass is.
        With a GradScaler given to first_step(), the perturbed gradients are
        unscaled here and ``scaler.update()`` is called once, skipped step
        or not.
        """
        if self._phase is None:
            raise ValueError("second_step() called before first_step()")
        phase, ctx = self._phase, self._pending
        assert ctx is not None
        self._phase, self._pending = None, None
        try:
            if phase == "skipped":
                self.counters["skipped_steps"] += 1
                return
            if phase == "perturbed":
                if not self._close_perturbed(ctx):
                    return
                if ctx.group is not None:
                    self._average_shard_values(ctx, grads=False)
            elif self._grads_replaced(ctx):
                # A pass ran after first_step() returned False (the popular
                # snippet always runs it): use, and check, what is in .grad now.
                self._refresh(ctx)
                if ctx.scaler is not None:
                    P.unscale_pass(ctx.scaler, [p for v in ctx.groups for p in v.params], ctx.scaler_views)
                ctx.grad_sq = [T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]
                if not self._finite(ctx, ctx.grad_sq, every_rank=False):
                    self._count_skip("perturbed")
                    return
            self._descend(ctx)
        finally:
            if ctx.scaler is not None:
                ctx.scaler.update()
            if zero_grad:
                self.zero_grad()

    def _close_perturbed(self, ctx: StepContext) -> bool:
        """After the perturbed pass: restore ``w``, read ``g_p`` (unscaled) and
        check it; False (the step counted as skipped) when it is non-finite."""
        self._restore(ctx)
        self._refresh(ctx)
        if not any(v.params for v in ctx.groups):
            raise ValueError(
                f"{type(self).__name__}: the perturbed pass left no gradient in .grad; it must run the "
                "forward and backward at w + eps (a closure that only returns the loss, or an "
                "optimizer.step() after a single manual backward, would descend along eps)"
            )
        if ctx.scaler is not None:
            P.unscale_pass(ctx.scaler, [p for v in ctx.groups for p in v.params], ctx.scaler_views)
        ctx.perturbed_sq = [T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]
        # Per-replica perturbed passes are averaged by DDP (every rank sees the
        # same g_p) except with chunks, whose passes all run locally.
        if self._finite(ctx, ctx.perturbed_sq, every_rank=ctx.chunked):
            return True
        self._count_skip("perturbed")
        return False

    def _count_skip(self, where: str) -> None:
        self._note_skip(where)
        self.counters["skipped_steps"] += 1

    def _average_shard_values(self, ctx: StepContext, grads: bool) -> None:
        """Average over the replicas what each computed from its own
        gradient: the kept clean gradients, the method's ``shard_state``
        and, with ``grads``, ``.grad`` itself (chunks: every pass was local)."""
        tensors = [g for v in ctx.groups for g in v.grads] if grads else []
        tensors += [c for v in ctx.groups for c in (v.clean or [])]
        for key in self.shard_state:
            tensors += [t for t in ctx.extra.get(key, {}).values() if t is not None]
        # Whether to call is decided by the class and ``grads`` alone, so every
        # rank calls (a rank whose list happens to be empty must still join).
        if grads or self.keeps_clean_grad or self.shard_state:
            P.all_reduce_mean_(tensors, ctx.group, _device(ctx))
        self._shard_norms(ctx, grads)

    @staticmethod
    def _shard_norms(ctx: StepContext, grads: bool = True) -> None:
        """Norms of the averaged gradients: of ``.grad`` when it was averaged
        (``grads``), and ``grad_sq`` from the kept clean copy after a
        perturbed pass (without one it stays the shards' own, which no hook
        reads after a perturbed pass)."""
        fe = ctx.foreach
        if ctx.perturbed:
            if grads:
                ctx.perturbed_sq = [T.sum_of_squares(v.grads, fe) for v in ctx.groups]
            if all(v.clean is not None for v in ctx.groups):
                ctx.grad_sq = [T.sum_of_squares(v.clean, fe) for v in ctx.groups]  # type: ignore[arg-type]
        elif grads:
            ctx.grad_sq = [T.sum_of_squares(v.grads, fe) for v in ctx.groups]

    @torch.no_grad()
    def _descend(self, ctx: StepContext) -> None:
        """Combine, clip, the base optimizer's step and the post-step term."""
        if ctx.perturbed:
            self._combine(ctx)
            self.counters["perturbed_steps"] += 1
        else:
            self._combine_unperturbed(ctx)
        self._clip(ctx)
        self.base_optimizer.step()
        self._post_step(ctx)
        self.counters["steps"] += 1
        # LR schedulers watch our `step` to warn about a missed
        # optimizer step; the explicit API steps through here.
        self._opt_called = True

    def cancel_step(self) -> None:
        """Abandon a step between first_step() and second_step(): restore ``w``
        exactly and leave every state untouched (for a perturbed pass that
        raised, say), the GradScaler's included. A no-op when no step is
        pending."""
        ctx, self._phase, self._pending = self._pending, None, None
        if ctx is not None:
            self._abandon(ctx)

    def _abandon(self, ctx: StepContext) -> None:
        with torch.no_grad():
            self._restore(ctx)  # the groups perturbed so far
        if ctx.scaler is not None:
            P.forget_passes(ctx.scaler, ctx.scaler_views)

    def step(  # type: ignore[override]
        self,
        closure: Callable[..., Any] | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        chunks: int | None = None,
    ) -> Any:
        """One full step; ``closure`` zeroes the gradients, runs forward and
        backward and returns the loss. It is called for the clean pass and,
        when the method needs it, again at ``w + eps``. Returns the clean
        loss.

        Unlike the popular SAM snippet, whose ``step(closure)`` expects the
        first backward to have been done already, this follows PyTorch's
        convention: do not call ``backward`` before ``step``.

        Args:
            closure: zero the gradients, forward, backward, return the loss.
                A closure that loops over micro-batches (each loss divided
                by their number) gives gradient accumulation.
            scaler: a ``torch.amp.GradScaler`` for fp16 mixed precision. The
                closure runs its forward under ``torch.autocast`` and calls
                ``scaler.scale(loss).backward()``; the optimizer unscales
                each pass's gradients before using them, skips the whole
                step when either pass has an inf/NaN (weights restored
                exactly, base state untouched) and calls ``scaler.update()``
                once. Do not call ``scaler.step``/``scaler.update`` yourself.
            chunks: m-sharpness on one device. The closure then takes the
                chunk index, ``closure(i)`` for ``i`` in ``range(chunks)``,
                and runs on that chunk of the batch (``x.split(m)``). Each
                chunk gets its own ``eps`` from its own gradient, and the
                step descends along the mean over chunks of the perturbed
                gradients (the mean clean gradient where the method uses
                ``g``). Returns the mean clean loss. Holds one more copy of
                the parameters during the step (the running sum).
        """
        if closure is None:
            raise ValueError(
                f"{type(self).__name__}.step() needs a closure that zeroes the gradients, runs forward "
                "and backward and returns the loss; without one use first_step()/second_step(). "
                "(Lightning's precision='16-mixed' calls step() without its closure: use "
                "plugins=[flatminima.lightning.SharpnessAwareMixedPrecision('16-mixed', device)])"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        enabled = P.scaler_enabled(scaler)  # type check before any pass runs
        if self._phase is not None:
            raise ValueError("step() called between first_step() and second_step(); finish that step first")
        if chunks is not None:
            return self._chunked_step(closure, V.positive_int("chunks", chunks), scaler)
        self._scaler = scaler if enabled else None
        try:
            with self._local_pass():
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
            self._scaler = None
        return loss

    def _local_pass(self) -> ContextManager[Any]:
        """``model.no_sync()`` when the clean gradient must stay on its replica."""
        ddp = P.ddp_module(self.model)
        if ddp is None or self.sync_perturbations:
            return nullcontext()
        return ddp.no_sync()

    def clean_pass(self) -> ContextManager[Any]:
        """Context for the clean forward and backward of the explicit API.

        Under DDP (``model=`` the ``DistributedDataParallel`` module) with
        per-replica perturbations (the default), it is ``model.no_sync()``:
        each replica's ``eps`` comes from its own gradient, and only the
        perturbed pass's gradient is averaged across replicas (the paper's
        m-sharpness and the official code's default). Elsewhere it does
        nothing. ``step(closure)`` uses it by itself.
        """
        return self._local_pass()

    def _backward(self, loss: Tensor) -> None:
        """``loss.backward()``, scaled when ``step`` was given a GradScaler: for
        methods whose closure form leaves the backward to the optimizer."""
        (loss if self._scaler is None else self._scaler.scale(loss)).backward()

    def _replica_group(self) -> Any:
        """The DDP process group when ``eps`` is per replica, else None."""
        ddp = P.ddp_module(self.model)
        if ddp is None or self.sync_perturbations:
            return None
        return ddp.process_group if P.world_size(ddp.process_group) > 1 else None

    def _run_closure(self, closure: Callable[..., Any], which: str) -> Any:
        """Run one pass of :meth:`step`: ``which`` is ``"clean"`` (at ``w``; its
        value is what ``step`` returns) or ``"perturbed"`` (at ``w + eps``,
        inside :meth:`perturbed_pass`). Either way the pass must leave the
        gradients of that point in ``.grad``.

        The default calls PyTorch's closure with gradients enabled. A method
        whose closure has another form overrides this (ESAM: per-sample
        losses, a ranking forward and a backward on a subset); the loop,
        the cancellation and the running statistics stay here.
        """
        with torch.enable_grad():
            return closure()

    def perturbed_pass(self) -> ContextManager[Any]:
        """Context for the perturbed pass: with ``model=`` given, running
        statistics (BatchNorm and any ``running_*`` buffer) are restored after
        it, so they come from the clean pass alone."""
        if self.model is None:
            return nullcontext()
        return P.preserve_running_stats(self.model)

    def _restore(self, ctx: StepContext) -> None:
        for v in ctx.groups:
            if v.saved is None:
                continue
            if v.swapped:
                for p, own in zip(v.params, v.saved):
                    p.data = own  # its own storage, untouched since the clean pass
                v.swapped = False
            else:
                T.copy_(v.params, v.saved, ctx.foreach)
            v.saved = None  # free the copy (or the w + eps buffer) now

    @staticmethod
    def _grads_replaced(ctx: StepContext) -> bool:
        """Whether ``.grad`` no longer holds the tensors first_step() saw (a
        zero_grad() and a backward in between re-bind them)."""
        for v in ctx.groups:
            seen = dict(zip(map(id, v.params), v.grads))
            for p in v.group["params"]:
                if p.grad is not seen.get(id(p), None):
                    return True
        return False

    def _check_dense(self, grad: Tensor) -> None:
        if grad.is_sparse:
            raise TypeError(f"{type(self).__name__} does not support sparse gradients")

    def _refresh(self, ctx: StepContext) -> None:
        """Point the views at the perturbed-pass gradients.

        Every parameter with a gradient now takes part in the rest of the
        step (non-finite check, combine, clipping), including one that got a
        gradient only in the perturbed pass (its clean gradient was zero, so
        its ``eps`` was zero: it gets a zero clean copy where one is kept).
        A parameter that lost its gradient drops out: the base optimizer
        skips it as it skips every parameter without a gradient.
        """
        for v in ctx.groups:
            clean = None if v.clean is None else dict(zip(map(id, v.params), v.clean))
            v.params = [p for p in v.group["params"] if p.grad is not None]
            v.grads = [p.grad for p in v.params]
            for g in v.grads:
                self._check_dense(g)
            if clean is not None:
                v.clean = [clean[id(p)] if id(p) in clean else torch.zeros_like(p) for p in v.params]

    def _clip(self, ctx: StepContext) -> None:
        if self.max_grad_norm is None:
            return
        norm = total([T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]).sqrt()
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        for v in ctx.groups:
            T.mul_(v.grads, coef, ctx.foreach)

    def _note_skip(self, where: str) -> None:
        if not self._warned_skip:
            self._warned_skip = True
            warnings.warn(
                f"{type(self).__name__}: non-finite gradient in the {where} pass; the step was skipped "
                "(weights and optimizer state unchanged). Later skips are counted in "
                ".skipped_steps without a warning.",
                RuntimeWarning,
                stacklevel=3,
            )

    # ------------------------------------------------------------------ counters
    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite."""
        return self.counters["skipped_steps"]

    @property
    def step_count(self) -> int:
        """Steps the base optimizer has taken through this optimizer."""
        return self.counters["steps"]

    @property
    def perturbed_steps(self) -> int:
        """Steps that ran the perturbed pass."""
        return self.counters["perturbed_steps"]

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: the base optimizer's state,
        this method's per-parameter and method-level state, its method-wide
        options (:attr:`method_options`, restored on load as param-group
        hyperparameters are) and the counters.
        Readable with ``torch.load(..., weights_only=True)``."""
        if self._phase is not None:
            raise ValueError("state_dict() called between first_step() and second_step(); save between steps")
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base": self.base_optimizer.state_dict(),
            "flatminima": {
                "format": _FORMAT,
                "method": type(self).__name__,
                "shapes": [list(p.shape) for p in self._all_params()],
                "counters": dict(self.counters),
                "method_state": _copy_state(self.method_state),
                "options": {name: getattr(self, name) for name in self.method_options},
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        meta = state_dict.get("flatminima") if isinstance(state_dict, Mapping) else None
        if not isinstance(meta, Mapping) or "base" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() expects a state dict saved by a flatminima optimizer; "
                "to load a plain optimizer's state use .base_optimizer.load_state_dict()"
            )
        if meta.get("method") != type(self).__name__:
            raise ValueError(
                f"state dict was saved by {meta.get('method')!r}, cannot load it into {type(self).__name__!r}"
            )
        if meta.get("format") != _FORMAT:
            raise ValueError(f"unsupported flatminima state dict format {meta.get('format')!r} (expected {_FORMAT})")
        shapes = [list(p.shape) for p in self._all_params()]
        saved = [list(s) for s in meta["shapes"]]
        if len(saved) != len(shapes):
            raise ValueError(f"state dict holds {len(saved)} parameters, this optimizer has {len(shapes)}")
        for i, (a, b) in enumerate(zip(saved, shapes)):
            if a != b:
                raise ValueError(f"parameter {i} has shape {b} here but {a} in the state dict")
        if self._phase is not None:
            self.cancel_step()
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # loading replaced both lists: share again
        self.counters = dict(meta["counters"])
        self.method_state = _copy_state(meta["method_state"])
        for name, value in meta.get("options", {}).items():  # absent in state dicts of earlier versions
            if name in self.method_options:
                setattr(self, name, value)


def _device(ctx: StepContext) -> torch.device:
    """Where the step's collectives run: the device of its parameters."""
    for group in ctx.groups:
        for p in group.group["params"]:
            return p.device
    return torch.device("cpu")


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}
