"""LookSAM: SAM every k steps, reusing the SAM gradient's orthogonal part in between."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from ._base import SharpnessAware, StepContext, total


def _host(values: list[Tensor]) -> list[float]:
    """0-dim tensors as Python floats, with one device synchronisation."""
    if not values:
        return []
    device = values[0].device
    return torch.stack([x.to(device=device, dtype=torch.float64) for x in values]).tolist()


def _ratio(inner: Tensor, g_sq: Tensor) -> Tensor:
    """``<g, g_s> / ||g||^2``, 0 where ``g = 0`` (no offset: an offset would
    leave a part of ``g_s`` parallel to ``g`` in ``g_v``)."""
    return torch.where(g_sq > 0, inner / torch.where(g_sq > 0, g_sq, torch.ones_like(g_sq)), torch.zeros_like(g_sq))


def _tolerance(tensors: list[Tensor]) -> float:
    """``||g_v|| <= tol * ||g_s||`` is rounding noise of ``g_s - c g``: 4 machine
    epsilons of the least precise dtype among ``tensors``."""
    return 4.0 * max((torch.finfo(t.dtype).eps for t in tensors), default=0.0)


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

    A ``g_v`` at rounding level, ``||g_v|| <= 4 eps_dtype ||g_s||`` (globally, or
    per tensor with ``layerwise``), is set to 0: it is noise of the
    subtraction (a 1-element tensor's orthogonal part is exactly 0), and the
    reuse step would scale it up to ``alpha ||g||``.

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

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        rho: neighbourhood radius (default 0.05).
        k: period of the SAM steps, an int >= 1 (default 5). One value for
            the whole optimizer; not part of the state dict (build a resumed
            optimizer with the same ``k``).
        alpha: weight of the reused component, >= 0 (default 0.7).
        layerwise: per-tensor cosines and norms instead of global ones
            (default False). One value for the whole optimizer; not part of
            the state dict.
        norm_eps: denominator offset ``eps0`` of the radius and of the
            reuse scale (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from the perturbed pass.
        **base_kwargs: the base optimizer's arguments.

    Cost: ``1 + 1/k`` forward-backward passes per step on average. Memory:
    ``g_v``, one persistent copy of the parameters; on SAM steps two more
    during the step (the saved ``w`` and the clean gradient ``g``, whose
    buffer then becomes the new ``g_v``); none on reuse steps.

    Example::

        opt = LookSAM(model.parameters(), torch.optim.SGD, rho=0.05, k=5, alpha=0.7, lr=0.1, momentum=0.9)
        loss = opt.step(closure)  # closure: zero_grad, forward, backward, return loss

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

    keeps_clean_grad = True
    method_options = SharpnessAware.method_options + ("k", "layerwise")
    group_checks = {
        "rho": V.non_negative,
        "alpha": V.non_negative,
        "norm_eps": V.positive,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        k: int = 5,
        alpha: float = 0.7,
        layerwise: bool = False,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.k = V.positive_int("k", k)
        self.layerwise = V.flag("layerwise", layerwise)
        defaults = dict(rho=rho, alpha=alpha, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )
        self.method_state["step"] = 0

    def _perturb_this_step(self, ctx: StepContext) -> bool:
        return self.method_state["step"] % self.k == 0

    # ------------------------------------------------------------------ SAM steps
    def _combine(self, ctx: StepContext) -> None:
        """``d = g_s`` (left in ``.grad``); the new ``g_v`` is built in the
        clean gradient's buffer, its norm read once (one device sync per SAM
        step), and both are committed after the base step."""
        fe = ctx.foreach
        norms: dict[Tensor, float] = {}
        if self.layerwise:
            for v in ctx.groups:
                assert v.clean is not None
                inner = T.dots(v.clean, v.grads, fe)
                g_sq = T.dots(v.clean, v.clean, fe)
                T.mul_each_(v.clean, [-_ratio(i, s) for i, s in zip(inner, g_sq)], fe)
                T.add_(v.clean, v.grads, fe)
                gv_norm = [math.sqrt(x) for x in _host(T.dots(v.clean, v.clean, fe))]
                gs_norm = [math.sqrt(x) for x in _host(T.dots(v.grads, v.grads, fe))]
                # g_v at rounding level is noise (always so for a 1-element tensor, whose
                # orthogonal part is exactly 0): drop it, or reuse steps would scale it up
                drop = [i for i, (a, b, t) in enumerate(zip(gv_norm, gs_norm, v.clean)) if a <= _tolerance([t]) * b]
                T.zero_([v.clean[i] for i in drop], fe)
                for i in drop:
                    gv_norm[i] = 0.0
                norms.update(zip(v.params, gv_norm))
            ctx.extra["g_v_norm"] = norms
        else:
            inner = total([T.dot(v.clean, v.grads, fe) for v in ctx.groups])  # type: ignore[arg-type]
            coef = -_ratio(inner, total(ctx.grad_sq))
            for v in ctx.groups:
                assert v.clean is not None
                T.axpby_(v.clean, coef, v.grads, 1.0, fe)
            assert ctx.perturbed_sq is not None
            gv_sq = total([T.sum_of_squares(v.clean, fe) for v in ctx.groups])  # type: ignore[arg-type]
            gv_norm, gs_norm = (math.sqrt(x) for x in _host([gv_sq, total(ctx.perturbed_sq)]))
            if gv_norm <= _tolerance([t for v in ctx.groups for t in v.params]) * gs_norm:
                for v in ctx.groups:
                    T.zero_(v.clean, fe)  # type: ignore[arg-type]
                gv_norm = 0.0
            ctx.extra["g_v_norm"] = gv_norm
        ctx.extra["g_v"] = [(p, gv) for v in ctx.groups for p, gv in zip(v.params, v.clean)]  # type: ignore[arg-type]
        for v in ctx.groups:
            v.clean = None

    # ------------------------------------------------------------------ reuse steps
    def _combine_unperturbed(self, ctx: StepContext) -> None:
        """``d = g + alpha ||g|| / (||g_v|| + eps0) g_v`` in ``.grad``: one fused
        ``g += c g_v`` per tensor with a host scalar ``c`` (no temporary);
        ``||g_v||`` was read at the SAM step, ``||g||`` costs one device sync."""
        fe = ctx.foreach
        if all(v.group["alpha"] == 0.0 for v in ctx.groups):
            return
        # (params, grads, g_v) of the parameters that have both
        triples = []
        for v in ctx.groups:
            have = [(p, g) for p, g in zip(v.params, v.grads) if "g_v" in self.state.get(p, {})]
            triples.append(([p for p, _ in have], [g for _, g in have], [self.state[p]["g_v"] for p, _ in have]))
        if self.layerwise:
            stored = self.method_state["g_v_norms"]
            index = {id(p): i for i, p in enumerate(self._all_params())}
            for v, (params, grads, gvs) in zip(ctx.groups, triples):
                alpha, eps0 = v.group["alpha"], v.group["norm_eps"]
                if alpha == 0.0 or not grads:
                    continue
                g_norm = [math.sqrt(x) for x in _host(T.dots(grads, grads, fe))]
                gv_norm = [stored[index[id(p)]] for p in params]
                T.add_each_(grads, gvs, [alpha * a / (b + eps0) for a, b in zip(g_norm, gv_norm)], fe)
            return
        g_norm = math.sqrt(float(total(ctx.grad_sq)))
        gv_norm = self.method_state["g_v_norm"]
        for v, (_, grads, gvs) in zip(ctx.groups, triples):
            alpha = v.group["alpha"]
            if alpha != 0.0 and grads:
                T.add_(grads, gvs, fe, alpha=alpha * g_norm / (gv_norm + v.group["norm_eps"]))

    # ------------------------------------------------------------------ commit
    def _post_step(self, ctx: StepContext) -> None:
        self.method_state["step"] += 1
        if not ctx.perturbed:
            return
        new = dict(ctx.extra["g_v"])
        norms = ctx.extra["g_v_norm"]
        if self.layerwise:  # per tensor, in parameter order (None: no g_v)
            self.method_state["g_v_norms"] = [norms.get(p) for p in self._all_params()]
        else:
            self.method_state["g_v_norm"] = norms
        for group in self.param_groups:
            for p in group["params"]:
                if p in new:
                    self.state[p]["g_v"] = new[p]
                elif "g_v" in self.state.get(p, {}):
                    del self.state[p]["g_v"]  # no gradient at this SAM step: g_v = 0
                    if not self.state[p]:
                        del self.state[p]
