"""One host read per step: the clean pass's finite check waits for the perturbed pass's.

On an accelerator, reading a device value into Python is a synchronisation: the host waits
for the device to drain its queue, and the device then waits for the host to queue work again.
``step(closure)`` of SAM-like methods needs two answers, "is ``g`` finite?" (before the
perturbation) and "is ``g_p`` finite?" (before the base step). When nothing before the
perturbed pass depends on the first answer, both are read at once, after the perturbed pass:
``||g||^2 + ||g_p||^2`` is finite exactly when both are (squares are never negative, so no
``inf - inf``). A non-finite ``g`` then makes ``eps`` non-finite, and the perturbed pass runs
at a non-finite point; the step is skipped as it would have been, with ``w`` restored exactly.

That wasted pass is harmless only when it cannot change anything that outlives the step, so
the check is deferred only when

* ``model=`` is given: the perturbed pass restores running statistics (BatchNorm) afterwards,
  which a forward at non-finite weights would otherwise poison for good;
* no GradScaler (its unscale reads the device anyway) and no per-replica DDP group (there the
  ranks must agree on the clean verdict before they part: ``Replicas.agree``);
* the schedule and the combine decide without the gradient (AE-SAM reads it on the host);
* the gradients live on an accelerator: on the CPU a read costs nothing, while a skipped step
  that runs no perturbed pass saves a forward and a backward.

One case answers differently: a float32 ``||g||^2`` that overflows (``||g|| > 1.8e19``) while
``g`` is finite. The early check takes it again in float64 and perturbs; deferred, ``eps`` is 0
and the step is skipped as non-finite (the gradients that could tell are gone by then).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from . import _tensorops as T
from ._context import StepContext, total

if TYPE_CHECKING:
    from ._base import SharpnessAware

#: None: defer on accelerators only; True: on every device (the tests, on the CPU); False: never
#: (the early check everywhere, to compare with)
FORCE: bool | None = None


def may_defer(opt: SharpnessAware, ctx: StepContext) -> bool:
    """Whether this step's clean finite check may wait for the perturbed pass (module docstring)."""
    if ctx.scaling is not None or ctx.group is not None or ctx.chunked or opt.pre_pass:
        return False
    if opt.model is None or opt.decides_from_gradient or not ctx.grad_sq:
        return False
    return ctx.grad_sq[0].device.type != "cpu" if FORCE is None else FORCE


def clean_phase(opt: SharpnessAware, ctx: StepContext, defer: bool) -> str:
    """The phase of a step from its clean gradients: "perturbed", "unperturbed" or "skipped".
    Deferred (``defer`` and :func:`may_defer`), a perturbed step reads nothing here: its clean
    ``||g||^2`` waits in ``ctx.clean_total`` for :func:`settle`."""
    if defer and may_defer(opt, ctx):
        wanted = opt._decide(ctx)  # no DDP group here: the replicas' decide is the method's
        if wanted:
            ctx.clean_total = total(ctx.grad_sq)
            return "perturbed"
        return "unperturbed" if opt._finite(ctx, ctx.grad_sq, every_rank=True) else "skipped"
    if not opt._finite(ctx, ctx.grad_sq, every_rank=True):
        return "skipped"
    if not opt._replicas().decide(ctx, lambda: opt._decide(ctx), opt.decides_from_gradient):
        return "unperturbed"
    return "perturbed"


def settle(clean: Tensor, perturbed_sq: list[Tensor]) -> str | None:
    """Both verdicts of a deferred step (``clean``: its ``||g||^2``) in one read: "finite" (both
    passes), "clean" (``g`` was not), or None (``g`` was; the perturbed pass's own check
    decides, its float64 retake of an overflow included)."""
    if T.is_finite(clean + total(perturbed_sq)):
        return "finite"
    return None if T.is_finite(clean) else "clean"
