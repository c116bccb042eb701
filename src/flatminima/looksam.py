"""LookSAM: SAM every k steps, reusing the SAM gradient's orthogonal part in between (a combine)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from . import _validate as V, _views as views
from ._base import SharpnessAware
from ._context import StepContext
from ._options import Option
from ._projection import add_reuse_, orthogonal_part_
from ._parts import Combine, Plain
from .every_k import EveryK


class Reuse(Combine):
    """SAM steps: ``d = g_s``, keep ``g_v = g_s - <g, g_s>/||g||^2 g``; others: ``d = g + alpha ||g||/||g_v|| g_v``."""

    name = "looksam"
    options = {
        "alpha": Option(0.7, V.non_negative, "weight of the reused component"),
        "layerwise": Option(False, V.flag, "per-tensor cosines and norms", wide=True),
    }
    needs_clean_grad = True
    param_state = ("g_v",)

    def needs_whole_tensors(self, opt: SharpnessAware, group: Mapping[str, Any]) -> str | None:
        return "layerwise=True takes cosines and norms per parameter tensor" if opt.layerwise else None  # type: ignore[attr-defined]

    def combine(self, opt: SharpnessAware, ctx: StepContext) -> None:
        """``d = g_s`` stays in ``.grad``; ``g_v`` is built in ``g``'s buffer, its
        norm read once (one sync per SAM step); both committed after the step."""
        ctx.extra["g_v_norm"] = orthogonal_part_(ctx, opt.layerwise)  # type: ignore[attr-defined]
        ctx.extra["g_v"] = [(p, gv) for v in ctx.groups for p, gv in zip(v.params, v.clean)]  # type: ignore[arg-type]
        views.release_clean(ctx)

    def combine_unperturbed(self, opt: SharpnessAware, ctx: StepContext) -> None:
        """``g += c g_v`` per tensor with a host scalar ``c`` (fused, no temporary)."""
        add_reuse_(opt, ctx, opt.layerwise)  # type: ignore[attr-defined]

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        if not ctx.perturbed:
            return
        new, norms = dict(ctx.extra["g_v"]), ctx.extra["g_v_norm"]
        if opt.layerwise:  # type: ignore[attr-defined]  # per tensor, in parameter order (None: no g_v)
            norms = [norms.get(p) for p in opt._all_params()]
        opt.method_state["g_v_norms" if opt.layerwise else "g_v_norm"] = norms  # type: ignore[attr-defined]
        for p in opt._all_params():
            if p in new:
                opt.state[p]["g_v"] = new[p]
            elif "g_v" in opt.state.get(p, {}):
                del opt.state[p]["g_v"]  # no gradient at this SAM step: g_v = 0
                if not opt.state[p]:
                    del opt.state[p]


class LookSAM(SharpnessAware):
    r"""LookSAM: a SAM step every ``k`` steps; in between, one pass and a reused direction.

    With ``t`` the number of steps taken so far (0 at the first step) and
    ``g = grad L(w)`` from the clean pass::

        t % k == 0 (SAM step, two passes):
            eps = rho * g / (||g|| + eps0)
            g_s = grad L(w + eps)
            g_v = g_s - <g, g_s> / ||g||^2 * g               # = g_s - ||g_s|| cos(theta) g/||g||,
                                                              #   the part of g_s orthogonal to g
                                                              #   (g_v = g_s where g = 0)
            w   = Base(w, g_s)                                # g_v kept for the next steps
        otherwise (one pass):
            w   = Base(w, g + alpha * ||g|| / (||g_v|| + eps0) * g_v)

    Norms and inner products are global over every parameter of every
    group (the paper's vectors). With ``layerwise=True`` they are taken per
    parameter tensor instead (``cos``, ``||g||`` and ``||g_v||`` of each
    tensor; the form of pytorch_optimizer and of most community code).
    ``rho``, ``alpha`` and ``norm_eps`` are per-group (with global norms, a
    group's ``alpha`` scales its share of the global ``g_v``).

    A ``g_v`` at rounding level, ``||g_v|| <= max(4 eps_work, eps_dtype / 2)
    ||g_s||`` (globally, or per tensor with ``layerwise``; ``eps_work`` of the
    precision the subtraction runs in, float32 for bf16 and fp16 tensors,
    which are projected in float32 and rounded once), is set to 0: it is
    noise of the subtraction (a 1-element tensor's orthogonal part is
    exactly 0), and the reuse step would scale it up to ``alpha ||g||``.

    ``g_v`` is per-parameter state (``state[p]["g_v"]``, saved by
    ``state_dict()``), replaced after each SAM step's base step (a step
    skipped for a non-finite gradient leaves it untouched); a parameter
    without a gradient at the last SAM step has none and is treated as
    ``g_v = 0``. ``||g_v||`` is read once, at the SAM step, and kept in
    ``method_state`` (``"g_v_norm"``, or per tensor ``"g_v_norms"`` in
    parameter order, Python floats); a reuse step reads ``||g||`` (one
    device sync) and adds ``c * g_v`` with a host scalar ``c``, fused, with
    no temporary. ``t`` counts steps taken (a skipped step does not count,
    so it is retried at the same ``t``) and lives in
    ``method_state["step"]``: a run resumed in the middle of a period
    continues bit for bit. On reuse steps ``first_step`` returns False and
    ``step(closure)`` calls the closure once.

    Special cases (bit for bit): ``k = 1`` is SAM; ``alpha = 0`` is SAM every
    ``k`` steps with the base optimizer on ``g`` in between
    (:class:`flatminima.SAMEveryK`).

    Formulas, special cases and departures: docs/algorithms.md#9-looksam.

    Args:
        rho: neighbourhood radius (default 0.05).
        k: period of the SAM steps, an int >= 1 (default 5). One value for
            the whole optimizer, saved with the state dict's options.
        alpha: weight of the reused component, >= 0 (default 0.7).
        layerwise: per-tensor cosines and norms instead of global ones
            (default False). One value for the whole optimizer, saved with
            the state dict's options.
        norm_eps: denominator offset ``eps0`` of the radius and of the
            reuse scale (default 1e-12).
        @shared_args@

    Cost: ``1 + 1/k`` forward-backward passes per step on average. Memory:
    ``g_v``, one persistent copy of the parameters; on SAM steps two more
    during the step (the saved ``w`` and the clean gradient ``g``, whose
    buffer then becomes the new ``g_v``); none on reuse steps.

    Example (``model`` and ``closure(opt)`` as in :class:`~flatminima.SAM`'s):
        >>> opt = flatminima.LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1)
        >>> loss = opt.step(closure(opt))
        >>> opt.step_count
        1

    Reference:
        Liu, Mai, Chen, Hsieh, You. Towards Efficient and Scalable
        Sharpness-Aware Minimization. CVPR 2022, arXiv:2203.02714
        (Algorithm 1; no official code).

    Departures: the projection coefficient ``||g_s|| cos(theta) / ||g||`` is
    computed as ``<g, g_s> / ||g||^2`` without an offset (0 when ``g = 0``;
    pytorch_optimizer adds 1e-8 to the norms, which leaves a part of ``g_s``
    parallel to ``g`` in ``g_v`` for small gradients) and ``g_v`` at rounding
    level is dropped (above); the reuse scale is ``||g|| / (||g_v|| + eps0)``
    with the library-wide ``eps0 = 1e-12`` (pytorch_optimizer: 1e-8, per
    tensor: ``layerwise=True, norm_eps=1e-8``). The paper's Look-LayerSAM (LAMB-style
    layer-wise scaling of the perturbation) is not implemented;
    ``layerwise`` only makes the projection and the reuse per tensor.
    """
    ascent = (Plain(),)
    combine = Reuse()
    schedule = EveryK()
