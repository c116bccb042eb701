"""Plain reference implementations written from docs/algorithms.md.

Deliberately naive: per-tensor Python loops, fresh tensors for every
intermediate, no in-place tricks, no multi-tensor kernels, nothing imported
from flatminima. The library's optimizers must match these to 1e-10 in
float64 (tests/test_reference.py).

A reference is a product of three independent parts, as the library's
methods are (docs/composition.md):

* an **ascent** chain: how eps comes from the clean gradient g (or, for a
  pre-pass ascent such as Momentum-SAM, from the base optimizer's state).
  Each part maps the vector v in chain order (v starts as g), the norm
  N = ||v|| is taken over every group and tensor, each part's ``finish`` maps
  u = v in reverse order, and eps_group = radius_group u / (N + norm_eps_group);
* a **combine**: how g and the perturbed gradient g_p become the direction
  handed to the base optimizer (and d on a step without a perturbed pass);
* a **schedule**: on which steps the perturbed pass runs.

``compose_reference(ascent, combine, schedule)`` builds a ``Reference``
class from the parts' names; ``REFERENCES`` maps every registered method to
its composition. One step (t = steps taken so far):

1. decide: schedule's decision AND not the combine's veto (AND, for a
   pre-pass ascent, some parameter has a momentum buffer);
2. if perturbing: eps from the ascent chain, w + eps, perturbed pass g_p,
   w restored by copy;
3. d from the combine; 4. ``p.grad = d``, ``base.step()``;
5. post-step terms (WSAM's decoupled term), then the state commits: the
   ascents' and the combine's only after a perturbed step, the schedule's
   after every step; t += 1.

Group hyperparameters are read with [] (no defaults); method-wide ones (k,
layerwise, sam_fraction, decay, gain, seed) from the first group. The
registered entries that today's callers build with fewer keys (SAM, ASAM,
GCSAM, WSAM, GSAM, SAM every k, AE-SAM: ``adaptive``, ``eta``,
``centralize``, ``norm_eps`` left out) fill those keys in from the entry's
``group_defaults``.
"""

from __future__ import annotations

import itertools
import math
from statistics import NormalDist
from typing import Any, Callable

import torch
from torch import Tensor

Nested = list[list[Tensor]]  # per group, per parameter


def global_norm(vectors: Nested) -> Tensor:
    total = torch.zeros((), dtype=torch.float64)
    for group in vectors:
        for v in group:
            total = total + (v.double() ** 2).sum()
    return total.sqrt()


def centralize(g: Tensor) -> Tensor:
    """Gradient centralisation (Yong et al. 2020): subtract the mean over all
    dims but dim 0, for tensors with >= 2 dims."""
    if g.dim() < 2:
        return g.clone()
    return g - g.mean(dim=tuple(range(1, g.dim())), keepdim=True)


def sam_eps_norm(eps: Nested, w: Nested | None = None, eta: float = 0.0) -> float:
    """||eps||, or ||T_w^-1 eps|| when ``w`` is given (ASAM)."""
    if w is None:
        return global_norm(eps).item()
    return global_norm([[e / (wi.abs() + eta) for e, wi in zip(es, ws)] for es, ws in zip(eps, w)]).item()


def esam_step_seed(seed: int, step: int) -> int:
    """SplitMix64 of seed + (step + 1) * 0x9E3779B97F4A7C15 (mod 2^64), cut to
    63 bits: the seed of step ``step``'s tensor mask (docs/methods/esam.md)."""
    m64 = 2**64
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) % m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m64
    return (z ^ (z >> 31)) % 2**63


def _lr(base: torch.optim.Optimizer, i: int) -> float:
    return base.param_groups[i]["lr"]


def _clone(values: Nested) -> Nested:
    return [[v.clone() for v in vs] for vs in values]


def _mean_nested(values: list[Nested]) -> Nested:
    n = len(values)
    return [[sum(parts) / n for parts in zip(*groups)] for groups in zip(*values)]


def _with_grad(groups: list[dict[str, Any]]) -> Nested:
    return [[p for p in grp["params"] if p.grad is not None] for grp in groups]


def _set(params: Nested, values: Nested) -> None:
    with torch.no_grad():
        for ps, vs in zip(params, values):
            for p, v in zip(ps, vs):
                p.copy_(v)


def _gradient_at(params: Nested, w: Nested, eps: Nested, closure: Callable[[], Tensor]) -> Nested:
    """The perturbed pass: w + eps, the closure's gradient there, w restored by copy."""
    _set(params, [[wi + e for wi, e in zip(ws, es)] for ws, es in zip(w, eps)])
    closure()
    gp = [[p.grad.detach().clone() for p in ps] for ps in params]
    _set(params, w)
    return gp


# --------------------------------------------------------------------------
# Ascent parts: v -> v (chain order), u -> u (``finish``, reverse order), the
# radius (rho, or what the combine makes of it) rescaled, state committed
# after a perturbed step. ``w``, ``g``, ``v``, ``params``: nested per group,
# per parameter (g is None for a pre-pass ascent).


class Ascent:
    name = ""
    #: builds eps before the step's pass, from the base optimizer's state
    pre_pass = False
    #: reads the clean gradient g (invalid with a pre-pass ascent)
    reads_g = False

    def __init__(self, ref: "Reference") -> None:
        self.ref = ref

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        return v

    def finish(self, w: Nested, g: Nested | None, u: Nested, params: Nested) -> Nested:
        return u

    def radius(self, i: int, grp: dict[str, Any], r: float) -> float:
        return r

    def commit(self, g: Nested | None) -> None:
        """After the base step of a perturbed step (g: the clean gradient)."""


class SAMAscent(Ascent):
    """SAM (§1): v = g."""

    name = "sam"


class ASAMAscent(Ascent):
    """ASAM (§2), where ``adaptive``: T_w = |w| + eta, v <- T v, u <- T u
    (eps = rho T^2 g / ||T g||)."""

    name = "asam"

    @staticmethod
    def _scale(groups: list[dict[str, Any]], w: Nested, x: Nested) -> Nested:
        return [
            [(wi.abs() + grp["eta"]) * xi for wi, xi in zip(ws, xs)] if grp["adaptive"] else xs
            for grp, ws, xs in zip(groups, w, x)
        ]

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        return self._scale(self.ref.groups, w, v)

    def finish(self, w: Nested, g: Nested | None, u: Nested, params: Nested) -> Nested:
        return self._scale(self.ref.groups, w, u)


class CentralizeAscent(Ascent):
    """GCSAM (§8), where ``centralize``: v <- GC(v) (the norm is taken after)."""

    name = "centralize"

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        return [[centralize(vi) for vi in vs] if grp["centralize"] else vs for grp, vs in zip(self.ref.groups, v)]


class FisherAscent(Ascent):
    """Fisher SAM (§6): f = 1 + eta g^2, v <- v/sqrt(f), u <- u/sqrt(f)
    (eps = rho (g/f) / (sqrt(sum g^2/f) + eps0))."""

    name = "fisher"
    reads_g = True

    def _divide(self, g: Nested | None, x: Nested) -> Nested:
        assert g is not None
        return [
            [xi / (1 + grp["eta"] * gi**2).sqrt() for gi, xi in zip(gs, xs)]
            for grp, gs, xs in zip(self.ref.groups, g, x)
        ]

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        return self._divide(g, v)

    def finish(self, w: Nested, g: Nested | None, u: Nested, params: Nested) -> Nested:
        return self._divide(g, u)


class FriendlyAscent(Ascent):
    """FriendlySAM (§9): v <- v - sigma m (m: EMA of g, none on the first
    step); after a perturbed step m = lam m + (1 - lam) g (m_1 = g)."""

    name = "friendly"
    reads_g = True

    def __init__(self, ref: "Reference") -> None:
        super().__init__(ref)
        self.m: Nested | None = None

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        if self.m is None:
            return v
        return [[vi - grp["sigma"] * mi for vi, mi in zip(vs, ms)] for grp, vs, ms in zip(self.ref.groups, v, self.m)]

    def commit(self, g: Nested | None) -> None:
        assert g is not None
        if self.m is None:
            self.m = _clone(g)
        else:
            self.m = [
                [grp["lam"] * mi + (1 - grp["lam"]) * gi for gi, mi in zip(gs, ms)]
                for grp, gs, ms in zip(self.ref.groups, g, self.m)
            ]


class VaSSOAscent(Ascent):
    """VaSSO (§9): d_t = (1 - theta) d_{t-1} + theta g (d_1 = g), v <- d_t;
    d committed after a perturbed step."""

    name = "vasso"
    reads_g = True

    def __init__(self, ref: "Reference") -> None:
        super().__init__(ref)
        self.d: Nested | None = None

    def _d_new(self, g: Nested | None) -> Nested:
        assert g is not None
        if self.d is None:
            return _clone(g)
        return [
            [(1 - grp["theta"]) * di + grp["theta"] * gi for gi, di in zip(gs, ds)]
            for grp, gs, ds in zip(self.ref.groups, g, self.d)
        ]

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        return self._d_new(g)

    def commit(self, g: Nested | None) -> None:
        self.d = self._d_new(g)


class ESAMAscent(Ascent):
    """ESAM's stochastic weight perturbation (§5, our decisions): a tensor
    mask drawn from a generator seeded with esam_step_seed(seed, t), one
    u = torch.rand(n_tensors, float64) over every parameter of every group in
    order, tensor j active iff u_j < beta of its group (every tensor when all
    beta >= 1); v_j <- 0 on inactive tensors, radius <- radius / beta."""

    name = "esam"

    def active(self) -> dict[int, bool]:
        groups = self.ref.groups
        everything = [(grp, p) for grp in groups for p in grp["params"]]
        if all(grp["beta"] >= 1 for grp, _ in everything):
            return {id(p): True for _, p in everything}
        gen = torch.Generator().manual_seed(esam_step_seed(groups[0]["seed"], self.ref.t))
        u = torch.rand(len(everything), generator=gen, dtype=torch.float64)
        return {id(p): bool(u[j] < grp["beta"]) for j, (grp, p) in enumerate(everything)}

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        assert v is not None
        active = self.active()
        return [[vi if active[id(p)] else torch.zeros_like(vi) for p, vi in zip(ps, vs)] for ps, vs in zip(params, v)]

    def radius(self, i: int, grp: dict[str, Any], r: float) -> float:
        return r / grp["beta"]


class MomentumAscent(Ascent):
    """Momentum-SAM (Becker et al. 2024), a pre-pass ascent: v = -buf, buf the
    base optimizer's momentum read before the step's pass
    (``momentum_buffer`` of SGD, ``exp_avg`` of Adam/AdamW); 0 for a
    parameter without one. No parameter with one (the first step): no
    perturbation."""

    name = "momentum"
    pre_pass = True

    def buffer(self, p: Tensor) -> Tensor | None:
        state = self.ref.base.state.get(p, {})
        for key in ("momentum_buffer", "exp_avg"):
            buf = state.get(key)
            if buf is not None:
                return buf
        return None

    def has_buffer(self, params: Nested) -> bool:
        return any(self.buffer(p) is not None for ps in params for p in ps)

    def vector(self, w: Nested, g: Nested | None, v: Nested | None, params: Nested) -> Nested:
        out = []
        for ps in params:
            row = []
            for p in ps:
                buf = self.buffer(p)
                row.append(torch.zeros_like(p.detach()) if buf is None else -buf.detach().clone())
            out.append(row)
        return out


# --------------------------------------------------------------------------
# Combine parts: (g, g_p) -> d on a perturbed step, g -> d on the others.


class Combine:
    name = ""
    #: reads the clean gradient g (invalid with a pre-pass ascent)
    reads_g = False

    def __init__(self, ref: "Reference") -> None:
        self.ref = ref

    def radius(self, i: int, grp: dict[str, Any]) -> float:
        return grp["rho"]

    def veto(self) -> bool:
        """True: this step runs no perturbed pass whatever the schedule says."""
        return False

    def direction(self, w: Nested | None, g: Nested | None, gp: Nested) -> Nested:
        return gp

    def direction_unperturbed(self, w: Nested | None, g: Nested) -> Nested:
        return g

    def post_step(self, w: Nested, g: Nested | None, gp: Nested) -> None:
        """After the base step of a perturbed step: edit the new weights ``w`` in place (list items)."""

    def commit(self, g: Nested | None, gp: Nested) -> None:
        """State, after a perturbed step."""

    def commit_every_step(self) -> None:
        """State, after every step."""


class SAMCombine(Combine):
    """SAM: d = g_p (g without a perturbed pass)."""

    name = "sam"


class WSAMCombine(Combine):
    """WSAM (§3): alpha = gamma/(1-gamma) per group. Coupled:
    d = g + alpha (g_p - g). Decoupled: d = g, then w <- w - lr alpha (g_p - g)
    with the group's current lr. No perturbed pass when alpha = 0 in every group."""

    name = "wsam"
    reads_g = True

    @staticmethod
    def alpha(grp: dict[str, Any]) -> float:
        return grp["gamma"] / (1 - grp["gamma"])

    def veto(self) -> bool:
        return all(self.alpha(grp) == 0 for grp in self.ref.groups)

    def direction(self, w: Nested | None, g: Nested | None, gp: Nested) -> Nested:
        assert g is not None
        out = []
        for grp, gs, gps in zip(self.ref.groups, g, gp):
            if grp["decouple"]:
                out.append([gi.clone() for gi in gs])
            else:
                a = self.alpha(grp)
                out.append([gi + a * (gpi - gi) for gi, gpi in zip(gs, gps)])
        return out

    def post_step(self, w: Nested, g: Nested | None, gp: Nested) -> None:
        assert g is not None
        for i, (grp, ws, gs, gps) in enumerate(zip(self.ref.groups, w, g, gp)):
            if grp["decouple"]:
                a, lr = self.alpha(grp), _lr(self.ref.base, i)
                for j in range(len(ws)):
                    ws[j] = ws[j] - lr * a * (gps[j] - gs[j])


class GSAMCombine(Combine):
    """GSAM (§4). Radius rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min)
    (clamped to [rho_min, rho]; rho when rho_min is None or lr_max == lr_min;
    lr_max: given, else the group's initial_lr, else the lr of the first
    step; lr_min: given, else 0).
    g_perp = g - <g, g_p>/(||g_p||^2 + eps0) g_p (global), d = g_p - alpha g_perp."""

    name = "gsam"
    reads_g = True

    def __init__(self, ref: "Reference") -> None:
        super().__init__(ref)
        self.first_lr: dict[int, float] = {}

    def radius(self, i: int, grp: dict[str, Any]) -> float:
        rho, rho_min = grp["rho"], grp["rho_min"]
        if rho_min is None:
            return rho
        bg = self.ref.base.param_groups[i]
        lr_max = grp["lr_max"]
        if lr_max is None:
            lr_max = bg.get("initial_lr", self.first_lr.get(i, bg["lr"]))
        lr_min = 0.0 if grp["lr_min"] is None else grp["lr_min"]
        if lr_max == lr_min:
            return rho
        ratio = min(max((bg["lr"] - lr_min) / (lr_max - lr_min), 0.0), 1.0)
        return rho_min + (rho - rho_min) * ratio

    def direction(self, w: Nested | None, g: Nested | None, gp: Nested) -> Nested:
        assert g is not None
        inner = sum((gi * gpi).sum() for gs, gps in zip(g, gp) for gi, gpi in zip(gs, gps))
        gp_sq = global_norm(gp) ** 2
        out = []
        for grp, gs, gps in zip(self.ref.groups, g, gp):
            c = inner / (gp_sq + grp["norm_eps"])
            out.append([gpi - grp["alpha"] * (gi - c * gpi) for gi, gpi in zip(gs, gps)])
        return out

    def commit_every_step(self) -> None:
        if self.ref.t == 0:
            for i, bg in enumerate(self.ref.base.param_groups):
                self.first_lr[i] = bg["lr"]


def working_tolerance(tensors: list[Tensor]) -> float:
    """LookSAM's rounding level (docs/methods/looksam.md): 4 machine epsilons
    of the precision the projection is computed in (float32 at least), or
    the unit roundoff of the tensors' own dtype, whichever is larger."""
    return max(
        max(4 * torch.finfo(torch.promote_types(t.dtype, torch.float32)).eps, torch.finfo(t.dtype).eps / 2)
        for t in tensors
    )


class LookSAMCombine(Combine):
    """LookSAM (§7). Perturbed step: d = g_s, and g_v = g_s - <g, g_s>/||g||^2 g
    (g_s where g = 0; a g_v at rounding level, ``||g_v|| <= working_tolerance
    * ||g_s||``, is 0) kept. Computed in the tensors' own dtype, plainly. Other steps: d = g + alpha ||g||/(||g_v|| + eps0) g_v (g
    without a g_v yet). Global vectors, or per tensor with ``layerwise``."""

    name = "looksam"
    reads_g = True

    def __init__(self, ref: "Reference") -> None:
        super().__init__(ref)
        self.gv: Nested | None = None
        self.gv_new: Nested | None = None

    def direction(self, w: Nested | None, g: Nested | None, gp: Nested) -> Nested:
        assert g is not None
        if self.ref.groups[0]["layerwise"]:
            self.gv_new = []
            for gs, gps in zip(g, gp):
                out = []
                for gi, gpi in zip(gs, gps):
                    g_sq = (gi * gi).sum()
                    gv = gpi - ((gi * gpi).sum() / g_sq if g_sq > 0 else 0.0) * gi
                    tol = working_tolerance([gv])
                    out.append(gv if gv.norm() > tol * gpi.norm() else torch.zeros_like(gv))
                self.gv_new.append(out)
        else:
            inner = sum((gi * gpi).sum() for gs, gps in zip(g, gp) for gi, gpi in zip(gs, gps))
            g_sq = global_norm(g) ** 2
            c = inner / g_sq if g_sq > 0 else 0.0
            self.gv_new = [[gpi - c * gi for gi, gpi in zip(gs, gps)] for gs, gps in zip(g, gp)]
            tol = working_tolerance([t for ts in gp for t in ts])
            if global_norm(self.gv_new) <= tol * global_norm(gp):
                self.gv_new = [[torch.zeros_like(t) for t in ts] for ts in self.gv_new]
        return gp

    def direction_unperturbed(self, w: Nested | None, g: Nested) -> Nested:
        if self.gv is None:
            return g
        groups = self.ref.groups
        if groups[0]["layerwise"]:
            return [
                [gi + grp["alpha"] * gi.norm() / (gvi.norm() + grp["norm_eps"]) * gvi for gi, gvi in zip(gs, gvs)]
                for grp, gs, gvs in zip(groups, g, self.gv)
            ]
        gn, gvn = global_norm(g), global_norm(self.gv)
        return [
            [gi + grp["alpha"] * gn / (gvn + grp["norm_eps"]) * gvi for gi, gvi in zip(gs, gvs)]
            for grp, gs, gvs in zip(groups, g, self.gv)
        ]

    def commit(self, g: Nested | None, gp: Nested) -> None:
        self.gv = self.gv_new


# --------------------------------------------------------------------------
# Schedule parts: whether step t runs the perturbed pass.


class Schedule:
    name = ""
    #: reads the clean gradient g (invalid with a pre-pass ascent)
    reads_g = False

    def __init__(self, ref: "Reference") -> None:
        self.ref = ref

    def decide(self, g: Nested | None) -> bool:
        return True

    def commit(self) -> None:
        """After every step (its own decision, whatever the combine vetoed)."""


class Always(Schedule):
    name = "always"


class EveryK(Schedule):
    """A perturbed pass iff t % k == 0 (k of the first group)."""

    name = "every_k"

    def decide(self, g: Nested | None) -> bool:
        return self.ref.t % self.ref.groups[0]["k"] == 0


class AESAMSchedule(Schedule):
    """AE-SAM (§9) with our threshold controller: x = ||g||^2,
    mu = decay mu + (1-decay) x, var = decay var + (1-decay)(x - mu)^2
    (first step: mu = x, var = 0); perturb iff x >= mu + c sqrt(var)
    (always for r = 1, never for r = 0); after every step c += gain (s - r),
    c_0 = Phi^-1(1 - r). Options of the first group."""

    name = "ae_sam"
    reads_g = True

    def __init__(self, ref: "Reference") -> None:
        super().__init__(ref)
        r = ref.groups[0]["sam_fraction"]
        self.mu, self.var = 0.0, 0.0
        self.c = NormalDist().inv_cdf(1 - r) if 0 < r < 1 else 0.0
        self.pending: tuple[float, float, bool] | None = None
        self.decisions: list[bool] = []

    def decide(self, g: Nested | None) -> bool:
        assert g is not None
        grp = self.ref.groups[0]
        r, delta = grp["sam_fraction"], grp["decay"]
        x = sum(float((gi.double() ** 2).sum()) for gs in g for gi in gs)
        if self.ref.t == 0:
            mu, var = x, 0.0
        else:
            mu = delta * self.mu + (1 - delta) * x
            var = delta * self.var + (1 - delta) * (x - mu) ** 2
        sam = True if r == 1 else False if r == 0 else x >= mu + self.c * math.sqrt(var)
        self.pending = (mu, var, sam)
        return sam

    def commit(self) -> None:
        assert self.pending is not None
        self.mu, self.var, sam = self.pending
        grp = self.ref.groups[0]
        self.c += grp["gain"] * (float(sam) - grp["sam_fraction"])
        self.decisions.append(sam)


ASCENTS: dict[str, type[Ascent]] = {
    cls.name: cls
    for cls in (SAMAscent, ASAMAscent, CentralizeAscent, FisherAscent, FriendlyAscent, VaSSOAscent, ESAMAscent, MomentumAscent)
}
COMBINES: dict[str, type[Combine]] = {cls.name: cls for cls in (SAMCombine, WSAMCombine, GSAMCombine, LookSAMCombine)}
SCHEDULES: dict[str, type[Schedule]] = {cls.name: cls for cls in (Always, EveryK, AESAMSchedule)}


# --------------------------------------------------------------------------
# The protocol, once.


class Reference:
    """One step as the module docstring says; the parts come from
    ``compose_reference`` (class attributes ``ascent_parts``,
    ``combine_part``, ``schedule_part``)."""

    #: (ascent chain, combine, schedule) by name
    product: tuple[tuple[str, ...], str, str] = ((), "sam", "always")
    ascent_parts: tuple[type[Ascent], ...] = ()
    combine_part: type[Combine] = SAMCombine
    schedule_part: type[Schedule] = Always
    #: keys filled into group dicts that lack them (legacy entries only)
    group_defaults: dict[str, Any] = {}

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        # list of {"params": [...], hyperparameters...}
        self.groups = [{**self.group_defaults, **grp} for grp in groups] if self.group_defaults else groups
        self.base = base
        self.t = 0  # steps taken
        self.ascent = [cls(self) for cls in self.ascent_parts] or [SAMAscent(self)]
        self.combine = self.combine_part(self)
        self.schedule = self.schedule_part(self)
        self.pre_pass = self.ascent[0].pre_pass
        #: per step: whether it ran a perturbed pass; the eps of the last one
        self.decisions: list[bool] = []
        self.last_eps: Nested | None = None

    # formulas -----------------------------------------------------------
    def perturbation(self, w: Nested, g: Nested | None, params: Nested) -> Nested:
        """eps from the ascent chain (g is None for a pre-pass ascent)."""
        v = None if g is None else _clone(g)
        for part in self.ascent:
            v = part.vector(w, g, v, params)
        assert v is not None
        norm = global_norm(v)  # before the finish steps
        u = v
        for part in reversed(self.ascent):
            u = part.finish(w, g, u, params)
        eps = []
        for i, (grp, us) in enumerate(zip(self.groups, u)):
            r = self.combine.radius(i, grp)
            for part in self.ascent:
                r = part.radius(i, grp, r)
            eps.append([r * ui / (norm + grp["norm_eps"]) for ui in us])
        self.last_eps = eps
        return eps

    def decide(self, g: Nested | None, params: Nested) -> bool:
        """Schedule's decision AND not the combine's veto (AND, pre-pass:
        some parameter has a momentum buffer)."""
        perturb = self.schedule.decide(g) and not self.combine.veto()
        if self.pre_pass:
            perturb = perturb and self.ascent[0].has_buffer(params)  # type: ignore[attr-defined]
        return perturb

    # the protocol -------------------------------------------------------
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        if self.pre_pass:
            return self._pre_pass_step([closure])[0]
        loss = closure()
        params = _with_grad(self.groups)
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = [[p.grad.detach().clone() for p in ps] for ps in params]
        gp = None
        if self.decide(g, params):
            gp = _gradient_at(params, w, self.perturbation(w, g, params), closure)
            d = self.combine.direction(w, g, gp)
        else:
            d = self.combine.direction_unperturbed(w, g)
        self._descend(params, g, gp, d)
        return loss

    def sharded_step(self, closures: list[Callable[[], Tensor]]) -> Tensor:
        """m-sharpness (§1, Foret et al. §4.1): one step over shards of the
        batch. Shard s has its own g_s and eps_s = perturbation(w, g_s);
        g = mean_s g_s, g_p = mean_s grad L_s(w + eps_s), and the step is
        the method's with (g, g_p): the decision is made on g, and the
        parts' state commits see g (the references' states are linear in g,
        so this is the mean of the shards'). A pre-pass ascent has one eps
        for every shard. Each closure zeroes, runs its shard forward and
        backward, returns the loss."""
        if self.pre_pass:
            return self._pre_pass_step(closures)[1]
        n = len(closures)
        losses, gs = [], []
        for closure in closures:
            losses.append(closure().detach())
            params = _with_grad(self.groups)
            gs.append([[p.grad.detach().clone() for p in ps] for ps in params])
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = _mean_nested(gs)
        gp = None
        if self.decide(g, params):
            gps = [_gradient_at(params, w, self.perturbation(w, g_s, params), c) for c, g_s in zip(closures, gs)]
            gp = _mean_nested(gps)
            d = self.combine.direction(w, g, gp)
        else:
            d = self.combine.direction_unperturbed(w, g)
        self._descend(params, g, gp, d)
        return sum(losses) / n

    def _pre_pass_step(self, closures: list[Callable[[], Tensor]]) -> tuple[Tensor, Tensor]:
        """A pre-pass ascent: eps before any pass (every parameter of every
        group), one closure call per shard at w + eps (at w when not
        perturbing), w restored by copy; no clean pass. Returns (the first
        call's loss, the mean loss)."""
        everything = [list(grp["params"]) for grp in self.groups]
        perturb = self.decide(None, everything)
        w_all = [[p.detach().clone() for p in ps] for ps in everything]
        if perturb:
            eps = self.perturbation(w_all, None, everything)
            w_eps = [[wi + e for wi, e in zip(ws, es)] for ws, es in zip(w_all, eps)]
        losses, grads = [], []
        params: Nested = []
        for closure in closures:
            if perturb:
                _set(everything, w_eps)
            losses.append(closure())
            params = _with_grad(self.groups)
            grads.append([[p.grad.detach().clone() for p in ps] for ps in params])
            if perturb:
                _set(everything, w_all)
        grad = grads[0] if len(grads) == 1 else _mean_nested(grads)
        w = [[p.detach().clone() for p in ps] for ps in params]
        if perturb:
            self._descend(params, None, grad, self.combine.direction(w, None, grad))
        else:
            self._descend(params, grad, None, self.combine.direction_unperturbed(w, grad))
        return losses[0], sum(loss.detach() for loss in losses) / len(losses)

    def _descend(self, params: Nested, g: Nested | None, gp: Nested | None, d: Nested) -> None:
        """Base step on d, post-step term, state commits, t += 1."""
        for ps, ds in zip(params, d):
            for p, di in zip(ps, ds):
                p.grad = di.clone()
        self.base.step()
        perturbed = gp is not None
        w_new = [[p.detach().clone() for p in ps] for ps in params]
        if gp is not None:
            self.combine.post_step(w_new, g, gp)
        _set(params, w_new)
        if gp is not None:
            for part in self.ascent:
                part.commit(g)
            self.combine.commit(g, gp)
        self.combine.commit_every_step()
        self.schedule.commit()
        self.decisions.append(perturbed)
        self.t += 1


#: the group keys each part reads (besides rho and norm_eps): two parts of
#: one product must not share one
PART_KEYS: dict[str, frozenset[str]] = {
    "sam": frozenset(),
    "asam": frozenset({"adaptive", "eta"}),
    "centralize": frozenset({"centralize"}),
    "fisher": frozenset({"eta"}),
    "friendly": frozenset({"sigma", "lam"}),
    "vasso": frozenset({"theta"}),
    "esam": frozenset({"beta", "seed", "gamma"}),  # gamma: RefESAM's data selection
    "momentum": frozenset(),
    "wsam": frozenset({"gamma", "decouple"}),
    "gsam": frozenset({"rho_min", "alpha", "lr_max", "lr_min"}),
    "looksam": frozenset({"alpha", "layerwise"}),
    "always": frozenset(),
    "every_k": frozenset({"k"}),
    "ae_sam": frozenset({"sam_fraction", "decay", "gain"}),
}
_ESAM_GAMMA = "gamma"  # ESAM's data-selection fraction, read by RefESAM's per-sample step


def _check_product(ascent: list[str], combine: str, schedule: str) -> None:
    for name in ascent:
        if name not in ASCENTS:
            raise ValueError(f"unknown ascent part {name!r} (known: {sorted(ASCENTS)})")
    if combine not in COMBINES:
        raise ValueError(f"unknown combine part {combine!r} (known: {sorted(COMBINES)})")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule part {schedule!r} (known: {sorted(SCHEDULES)})")
    if len(set(ascent)) != len(ascent):
        raise ValueError(f"ascent chain {ascent} names a part twice")
    pre = [name for name in ascent if ASCENTS[name].pre_pass]
    if pre:
        if ascent[0] != pre[0] or len(pre) > 1:
            raise ValueError(f"ascent chain {ascent}: a pre-pass ascent ({pre[0]!r}) must come first, alone of its kind")
        readers = [f"ascent {n!r}" for n in ascent if ASCENTS[n].reads_g]
        readers += [f"combine {combine!r}"] if COMBINES[combine].reads_g else []
        readers += [f"schedule {schedule!r}"] if SCHEDULES[schedule].reads_g else []
        if readers:
            raise ValueError(
                f"{pre[0]!r} ascent has no clean pass, so no g for {', '.join(readers)}"
            )
    parts = [*ascent, combine, schedule]
    for a, b in itertools.combinations(parts, 2):
        shared = PART_KEYS[a] & PART_KEYS[b]
        if shared:
            raise ValueError(f"parts {a!r} and {b!r} both read the group key {sorted(shared)[0]!r}")


def compose_reference(
    ascent: list[str] | tuple[str, ...],
    combine: str,
    schedule: str,
    *,
    group_defaults: dict[str, Any] | None = None,
    name: str | None = None,
) -> type[Reference]:
    """The ``Reference`` class of the product (ascent chain, combine,
    schedule); its constructor is ``(groups, base)``. ``group_defaults``:
    keys filled into groups that lack them (for legacy entries; products
    read every key with []). ValueError for an unknown part or an invalid
    product (a pre-pass ascent with a part that reads g, or not first; two
    parts sharing a group key)."""
    ascent = list(ascent)
    _check_product(ascent, combine, schedule)
    label = f"{'+'.join(ascent) or 'sam'}|{combine}|{schedule}"
    attrs = {
        "ascent_parts": tuple(ASCENTS[n] for n in ascent),
        "combine_part": COMBINES[combine],
        "schedule_part": SCHEDULES[schedule],
        "group_defaults": dict(group_defaults or {}),
        "product": (tuple(ascent), combine, schedule),
        "__doc__": f"Reference composed of ascent {ascent}, combine {combine!r}, schedule {schedule!r}.",
    }
    return type(name or f"Ref[{label}]", (Reference,), attrs)


# --------------------------------------------------------------------------
# ESAM's data selection (§5): per-sample closures are not a part of the
# product; the registered entry keeps its own step on top of the "esam" ascent.


class RefESAM(compose_reference(["esam"], "sam", "always")):  # type: ignore[misc]
    """ESAM (§5, our decisions). Mask and eps from the "esam" ascent:
    eps_j = (rho/beta) g_j/(||g_active|| + eps0) on active tensors, 0
    elsewhere; the clean pass runs on every tensor (the masked ones'
    gradients are simply not used). With per-sample losses and gamma < 1: a
    no-grad forward at w + eps, the max(1, floor(gamma n)) samples of largest
    l(w + eps) - l(w) in batch order, g_p = grad of their mean loss at
    w + eps. Base(w, g_p)."""

    def _shard(self, closure: Callable[..., Tensor]) -> tuple[Tensor, Nested, Nested, Nested]:
        """Clean pass, eps, (selection,) perturbed pass, restore: (loss, params, g, g_p)."""
        grp0 = self.groups[0]
        self.base.zero_grad()
        out = closure()
        per_sample = out.dim() == 1
        if per_sample:
            out.mean().backward()
        params = _with_grad(self.groups)
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = [[p.grad.detach().clone() for p in ps] for ps in params]
        eps = self.perturbation(w, g, params)
        _set(params, [[wi + e for wi, e in zip(ws, es)] for ws, es in zip(w, eps)])
        if per_sample:
            n = out.numel()
            keep = max(1, math.floor(grp0[_ESAM_GAMMA] * n))
            indices = None
            if keep < n:
                with torch.no_grad():
                    after = closure()
                indices = torch.topk(after - out.detach(), keep).indices.sort().values
            self.base.zero_grad()
            (closure() if indices is None else closure(indices)).mean().backward()
            loss = out.detach().mean()
        else:
            closure()
            loss = out
        gp = [[p.grad.detach().clone() for p in ps] for ps in params]
        _set(params, w)
        return loss, params, g, gp

    def step(self, closure: Callable[..., Tensor]) -> Tensor:
        loss, params, g, gp = self._shard(closure)
        self._descend(params, g, gp, gp)
        return loss

    def sharded_step(self, closures: list[Callable[..., Tensor]]) -> Tensor:
        """m-sharpness: the step's one mask, each shard's own eps and
        selection, g_p the mean over shards."""
        results = [self._shard(closure) for closure in closures]
        g = _mean_nested([g for _, _, g, _ in results])
        gp = _mean_nested([gp for _, _, _, gp in results])
        self._descend(results[-1][1], g, gp, gp)
        return sum(loss.detach() for loss, _, _, _ in results) / len(results)


# --------------------------------------------------------------------------
# The registered methods as products.

#: what the entries that read keys with .get before the three axes filled in
_SAM_DEFAULTS = {"adaptive": False, "eta": 0.01, "centralize": False, "norm_eps": 1e-12}

REFERENCES: dict[str, type[Reference]] = {}
for _name in ("sam", "asam", "gcsam"):
    REFERENCES[_name] = compose_reference(["centralize", "asam"], "sam", "always", group_defaults=_SAM_DEFAULTS)
REFERENCES.update(
    {
        "wsam": compose_reference(
            ["asam"], "wsam", "always", group_defaults={"adaptive": False, "eta": 0.01, "norm_eps": 1e-12}
        ),
        "gsam": compose_reference(["asam"], "gsam", "always", group_defaults={"adaptive": False, "eta": 0.01}),
        "fisher_sam": compose_reference(["fisher"], "sam", "always"),
        "friendly_sam": compose_reference(["friendly"], "sam", "always"),
        "vasso": compose_reference(["vasso"], "sam", "always"),
        "looksam": compose_reference([], "looksam", "every_k"),
        "sam_every_k": compose_reference(["centralize", "asam"], "sam", "every_k", group_defaults=_SAM_DEFAULTS),
        "ae_sam": compose_reference(["centralize", "asam"], "sam", "ae_sam", group_defaults=_SAM_DEFAULTS),
        "esam": RefESAM,
        "momentum_sam": compose_reference(["momentum"], "sam", "always"),
    }
)


# --------------------------------------------------------------------------
# Every valid product, for generated tests.

_CHAINS: list[tuple[str, ...]] = [
    (), ("asam",), ("centralize",), ("fisher",), ("friendly",), ("vasso",), ("esam",), ("momentum",), ("momentum", "asam")
]


def _valid(ascent: tuple[str, ...], combine: str, schedule: str) -> bool:
    try:
        _check_product(list(ascent), combine, schedule)
    except ValueError:
        return False
    return True


#: every valid (ascent chain, combine, schedule) over the chains above, the
#: combines and the schedules: without momentum x (wsam | gsam | looksam |
#: ae_sam), fisher x asam (group key "eta"), esam x wsam (group key "gamma")
VALID_PRODUCTS: list[tuple[tuple[str, ...], str, str]] = [
    (chain, combine, schedule)
    for chain, combine, schedule in itertools.product(_CHAINS, COMBINES, SCHEDULES)
    if _valid(chain, combine, schedule)
]


def valid_products() -> list[tuple[list[str], str, str]]:
    """VALID_PRODUCTS with the chains as lists (compose_reference's arguments)."""
    return [(list(chain), combine, schedule) for chain, combine, schedule in VALID_PRODUCTS]


#: per part name, the group hyperparameters a generated test puts in every
#: group ("sam" is both an ascent and a combine; neither reads a key of its
#: own); "common": every product's. product_hparams merges them.
PRODUCT_HPARAMS: dict[str, dict[str, Any]] = {
    "common": {"rho": 0.05, "norm_eps": 1e-12},
    # ascents
    "sam": {},
    "asam": {"adaptive": True, "eta": 0.01},
    "centralize": {"centralize": True},
    "fisher": {"eta": 1.0},
    "friendly": {"sigma": 1.0, "lam": 0.9},
    "vasso": {"theta": 0.9},
    "esam": {"beta": 0.5, "gamma": 1.0, "seed": 74},
    "momentum": {"rho": 0.5},
    # combines
    "wsam": {"gamma": 0.9, "decouple": True},
    "gsam": {"rho_min": None, "alpha": 0.4, "lr_max": None, "lr_min": None},
    "looksam": {"alpha": 0.7, "layerwise": False},
    # schedules
    "always": {},
    "every_k": {"k": 2},
    "ae_sam": {"sam_fraction": 0.5, "decay": 0.9, "gain": 0.05},
}


def product_hparams(ascent: list[str] | tuple[str, ...], combine: str, schedule: str) -> dict[str, Any]:
    """The group hyperparameters of a product: "common", then each ascent
    part's, the combine's, the schedule's (a later part's key wins)."""
    out = dict(PRODUCT_HPARAMS["common"])
    for part in [*ascent, combine, schedule]:
        out.update(PRODUCT_HPARAMS[part])
    return out
