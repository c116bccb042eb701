"""GSAM: surrogate-gap guided SAM, with a radius that follows the learning rate (a combine)."""

from __future__ import annotations

from typing import Any

from . import _lr_range as R
from . import _sharding as S, _tensorops as T, _validate as V, _views as views
from ._base import SharpnessAware
from ._context import GroupView, StepContext, total
from ._options import Option
from ._parts import Combine
from .asam import Adaptive



class SurrogateGap(Combine):
    """``d = g_p - alpha g_perp``, ``g_perp = g - <g, g_p>/(||g_p||^2 + eps0) g_p``; radius ``rho_t``."""

    name = "gsam"
    options = {
        "rho_min": Option(None, V.optional_non_negative, "the radius at lr_min (None: constant rho)"),
        "alpha": Option(0.4, V.non_negative, "weight of the surrogate-gap term"),
        "lr_max": Option(None, V.optional_non_negative, "lr at which rho_t = rho"),
        "lr_min": Option(None, V.optional_non_negative, "lr at which rho_t = rho_min"),
    }
    needs_clean_grad = True

    check_group = staticmethod(R.check_range)  # type: ignore[assignment]  # rho_min <= rho, lr_min <= lr_max

    def radius(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, radius: Any) -> Any:
        return R.current_rho(view.group)

    def combine(self, opt: SharpnessAware, ctx: StepContext) -> None:
        active = [v for v in ctx.groups if v.group["alpha"] != 0.0 and v.params]
        if active or ctx.shards is not None:  # over every group (every shard's rank joins); alpha per group
            inner = S.inner(ctx, [v.clean for v in ctx.groups], [v.grads for v in ctx.groups])  # type: ignore[misc]
            gp_sq = total(ctx.perturbed_sq or [])
        for v in active:
            T.axpby_(v.clean, 1.0, v.grads, -inner / (gp_sq + v.group["norm_eps"]), ctx.foreach)  # type: ignore[arg-type]  # g_perp, in g's buffer
            T.add_(v.grads, v.clean, ctx.foreach, alpha=-v.group["alpha"])  # type: ignore[arg-type]
        views.release_clean(ctx)

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        for v in ctx.groups:
            R.record_lr_max(v.group)


class GSAM(SharpnessAware):
    r"""Surrogate Gap Guided SAM: descend ``f_p`` and the surrogate gap ``f_p - f`` together.

    Each step, with ``g = grad L(w)`` from the clean pass::

        rho_t  = rho_min + (rho - rho_min) * clamp((lr_t - lr_min) / (lr_max - lr_min), 0, 1)
                                                 # rho_t = rho when rho_min is None or lr_max == lr_min
        eps    = rho_t * g / (||g|| + eps0)      # or ASAM's eps with adaptive=True
        g_p    = grad L(w + eps)                 # perturbed pass
        g_perp = g - <g, g_p> / (||g_p||^2 + eps0) * g_p
        w      = Base(w, g_p - alpha * g_perp)

    Inner products and norms are global over every group; ``alpha`` and the
    radius are per group. ``lr_t`` is the group's current ``lr``, so ``rho_t``
    follows whatever LR scheduler drives the optimizer.

    The lr range of the schedule, per group:

    * ``lr_max``: as given; else the group's ``"initial_lr"`` (set by every
      torch LR scheduler: the right peak for decaying schedules, cosine,
      linear, step, exponential, and warmup followed by decay); else the lr
      of the first step (recorded in the param group, so it is saved with
      the state dict).
    * ``lr_min``: as given; else 0.0.
    * :meth:`set_lr_range` reads both from a torch scheduler (its
      ``eta_min``, end factor, ``OneCycleLR``'s ``max_lr``/``min_lr``...):
      call it once after building the scheduler; needed for schedules whose
      peak is not ``initial_lr`` (``OneCycleLR``, ``CyclicLR``).

    Formulas, special cases and departures: docs/algorithms.md#5-gsam.

    Args:
        rho: the radius, ``rho_max`` of the schedule (default 0.05).
        rho_min: the radius at ``lr_min`` (default None: constant ``rho``);
            must not exceed ``rho``.
        alpha: weight of the surrogate-gap term, >= 0 (default 0.4).
        lr_max: lr at which ``rho_t = rho`` (default None: see above).
        lr_min: lr at which ``rho_t = rho_min`` (default None: 0.0).
        @shared_args@

    Memory: two copies of the parameters during the step (the saved ``w``
    and the clean gradient ``g``, which then holds ``g_perp``), none between
    steps.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.GSAM(model.parameters(), torch.optim.AdamW, rho=0.6, rho_min=0.0, alpha=0.4, lr=3e-3)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=300, eta_min=3e-5)
        >>> opt.set_lr_range(sched)            # lr_max = 3e-3, lr_min = 3e-5
        [(3e-05, 0.003)]
        >>> loss = opt.step(closure(opt)); sched.step()
        >>> float(opt.current_rho(opt.param_groups[0]))   # rho_t follows the lr down
        0.59998...

    Reference:
        Zhuang, Gong, Yuan, Cui, Adam, Dvornek, Tatikonda, Duncan, Liu.
        Surrogate Gap Minimization Improves Sharpness-Aware Training.
        ICLR 2022, arXiv:2203.08065. Official code: google-research/big_vision
        (JAX) and juntang-zhuang/GSAM (PyTorch).

    Departures: ``adaptive`` is the library-wide ASAM operator
    ``eps = rho T_w^2 g / ||T_w g||`` (the paper and the JAX code use
    ``rho |w| g / ||g||``; the PyTorch port uses the eta-free ASAM form,
    ``eta=0`` here). The projection divides by ``||g_p||^2 + eps0``, the
    paper's formula (the PyTorch port goes through a cosine with two
    offsets; the results agree to within those offsets). ``rho_t`` is
    clamped to ``[rho_min, rho]`` when the lr leaves ``[lr_min, lr_max]``
    (the official scheduler extrapolates). The radius follows the lr of
    each group instead of a separate ``ProportionScheduler`` object.
    """
    ascent = (Adaptive(),)
    combine = SurrogateGap()
    lr_range = staticmethod(R.lr_range)  # (lr_min, lr_max) of a group now
    current_rho = staticmethod(R.current_rho)  # the radius rho_t a step would use now in a group
    set_lr_range = R.set_lr_range  # lr_min/lr_max of every group from a torch LR scheduler
