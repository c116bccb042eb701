"""Plain reference implementations written from ../shared/ALGORITHMS.md.

Deliberately naive: per-tensor Python loops, fresh tensors for every
intermediate, no in-place tricks, no multi-tensor kernels, nothing imported
from flatminima. The library's optimizers must match these to 1e-10 in
float64 (tests/test_reference.py).

A reference method is a subclass of ``Reference`` that defines the
perturbation ``eps`` from the clean gradient (``perturbation``) and the
direction handed to the base optimizer (``direction``); the generic ``step``
runs the two passes exactly as ALGORITHMS.md §0 describes.
"""

from __future__ import annotations

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


class Reference:
    """Two passes, restore by copy, then ``base.step()`` on ``direction``."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        self.groups = groups  # list of {"params": [...], hyperparameters...}
        self.base = base
        self.t = 0  # steps taken

    # formulas -----------------------------------------------------------
    def perturbation(self, w: Nested, g: Nested) -> Nested:
        raise NotImplementedError

    def direction(self, w: Nested, g: Nested, gp: Nested) -> Nested:
        return gp

    def needs_second_pass(self, w: Nested, g: Nested) -> bool:
        return True

    def direction_single(self, w: Nested, g: Nested) -> Nested:
        return g

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        pass

    # the protocol -------------------------------------------------------
    def step(self, closure: Callable[[], Tensor]) -> Tensor:
        loss = closure()
        params = [[p for p in grp["params"] if p.grad is not None] for grp in self.groups]
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = [[p.grad.detach().clone() for p in ps] for ps in params]
        gp = None
        if self.needs_second_pass(w, g):
            gp = _gradient_at(params, w, self.perturbation(w, g), closure)
            d = self.direction(w, g, gp)
        else:
            d = self.direction_single(w, g)
        self._descend(params, g, gp, d)
        return loss

    def _descend(self, params: Nested, g: Nested, gp: Nested | None, d: Nested) -> None:
        for ps, ds in zip(params, d):
            for p, di in zip(ps, ds):
                p.grad = di.clone()
        self.base.step()
        w_new = [[p.detach().clone() for p in ps] for ps in params]
        with torch.no_grad():
            self.after_base_step(w_new, g, gp)
            for ps, ws in zip(params, w_new):
                for p, wn in zip(ps, ws):
                    p.copy_(wn)
        self.t += 1

    def sharded_step(self, closures: list[Callable[[], Tensor]]) -> Tensor:
        """m-sharpness (§1, Foret et al. §4.1): one step over shards of the
        batch. Shard s has its own g_s and eps_s = perturbation(w, g_s);
        g = mean_s g_s, g_p = mean_s grad L_s(w + eps_s), and the step is
        the method's with (g, g_p): the choice of a perturbed pass is made
        on g, as is any state the perturbation records (the reference's
        states are linear in g, so this is the mean of the shards'). Each
        closure zeroes, runs its shard forward and backward, returns the loss."""
        n = len(closures)
        losses, gs = [], []
        for closure in closures:
            losses.append(closure().detach())
            params = [[p for p in grp["params"] if p.grad is not None] for grp in self.groups]
            gs.append([[p.grad.detach().clone() for p in ps] for ps in params])
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = _mean_nested(gs)
        gp = None
        if self.needs_second_pass(w, g):
            gps = [_gradient_at(params, w, self.perturbation(w, g_s), c) for c, g_s in zip(closures, gs)]
            self.perturbation(w, g)  # the state it records: that of the mean gradient
            gp = _mean_nested(gps)
            d = self.direction(w, g, gp)
        else:
            d = self.direction_single(w, g)
        self._descend(params, g, gp, d)
        return sum(losses) / n


def _gradient_at(params: Nested, w: Nested, eps: Nested, closure: Callable[[], Tensor]) -> Nested:
    """The perturbed pass: w + eps, the closure's gradient there, w restored by copy."""
    with torch.no_grad():
        for ps, es in zip(params, eps):
            for p, e in zip(ps, es):
                p.copy_(p + e)
    closure()
    gp = [[p.grad.detach().clone() for p in ps] for ps in params]
    with torch.no_grad():
        for ps, ws in zip(params, w):
            for p, w0 in zip(ps, ws):
                p.copy_(w0)
    return gp


def _mean_nested(values: list[Nested]) -> Nested:
    n = len(values)
    return [[sum(parts) / n for parts in zip(*groups)] for groups in zip(*values)]


class RefSAM(Reference):
    """SAM (§1), ASAM (§2, T_w = |w| + eta, eps = rho T^2 g / ||T g||) and
    GCSAM (§8, eps = rho GC(g)/||GC(g)||, norm after centralising)."""

    def ascent(self, grp: dict[str, Any], w: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
        """(v, T) for one tensor: the vector whose global norm normalises eps."""
        v = centralize(g) if grp.get("centralize", False) else g.clone()
        t = w.abs() + grp.get("eta", 0.01) if grp.get("adaptive", False) else torch.ones_like(w)
        return t * v, t

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        vs, ts = [], []
        for grp, ws, gs in zip(self.groups, w, g):
            pairs = [self.ascent(grp, wi, gi) for wi, gi in zip(ws, gs)]
            vs.append([v for v, _ in pairs])
            ts.append([t for _, t in pairs])
        norm = global_norm(vs)
        return [
            [grp["rho"] * t * v / (norm + grp.get("norm_eps", 1e-12)) for v, t in zip(vgroup, tgroup)]
            for grp, vgroup, tgroup in zip(self.groups, vs, ts)
        ]


def sam_eps_norm(eps: Nested, w: Nested | None = None, eta: float = 0.0) -> float:
    """||eps||, or ||T_w^-1 eps|| when ``w`` is given (ASAM)."""
    if w is None:
        return global_norm(eps).item()
    return global_norm([[e / (wi.abs() + eta) for e, wi in zip(es, ws)] for es, ws in zip(eps, w)]).item()


REFERENCES: dict[str, type[Reference]] = {"sam": RefSAM, "asam": RefSAM, "gcsam": RefSAM}


# --------------------------------------------------------------------------
# WSAM, GSAM, Fisher SAM, FriendlySAM, VaSSO (ALGORITHMS.md §3, §4, §6, §9).
# Group hyperparameters are read with [] (no defaults): a Case's ref_hparams
# must write the method's full definition out.


def _lr(base: torch.optim.Optimizer, i: int) -> float:
    return base.param_groups[i]["lr"]


class RefWSAM(RefSAM):
    """WSAM (§3). eps as SAM (or ASAM with ``adaptive``); alpha = gamma/(1-gamma).
    Coupled: Base(w, g + alpha (g_p - g)). Decoupled: Base(w, g), then
    w <- w - lr * alpha * (g_p - g) with the group's current lr."""

    @staticmethod
    def alpha(grp: dict[str, Any]) -> float:
        return grp["gamma"] / (1 - grp["gamma"])

    def direction(self, w: Nested, g: Nested, gp: Nested) -> Nested:
        out = []
        for grp, gs, gps in zip(self.groups, g, gp):
            if grp["decouple"]:
                out.append([gi.clone() for gi in gs])
            else:
                a = self.alpha(grp)
                out.append([gi + a * (gpi - gi) for gi, gpi in zip(gs, gps)])
        return out

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        assert gp is not None
        for i, (grp, ws, gs, gps) in enumerate(zip(self.groups, w, g, gp)):
            if grp["decouple"]:
                a, lr = self.alpha(grp), _lr(self.base, i)
                for j in range(len(ws)):
                    ws[j] = ws[j] - lr * a * (gps[j] - gs[j])


class RefGSAM(RefSAM):
    """GSAM (§4). rho_t = rho_min + (rho - rho_min)(lr_t - lr_min)/(lr_max - lr_min)
    (clamped to [rho_min, rho]; rho when rho_min is None or lr_max == lr_min;
    lr_max: given, else the group's initial_lr, else the lr of the first
    step; lr_min: given, else 0). eps as SAM/ASAM with rho_t.
    g_perp = g - <g, g_p>/(||g_p||^2 + eps0) g_p (global), d = g_p - alpha g_perp."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        super().__init__(groups, base)
        self.first_lr: dict[int, float] = {}

    def rho_t(self, i: int, grp: dict[str, Any]) -> float:
        rho, rho_min = grp["rho"], grp["rho_min"]
        if rho_min is None:
            return rho
        bg = self.base.param_groups[i]
        lr_max = grp["lr_max"]
        if lr_max is None:
            lr_max = bg.get("initial_lr", self.first_lr.get(i, bg["lr"]))
        lr_min = 0.0 if grp["lr_min"] is None else grp["lr_min"]
        if lr_max == lr_min:
            return rho
        ratio = min(max((bg["lr"] - lr_min) / (lr_max - lr_min), 0.0), 1.0)
        return rho_min + (rho - rho_min) * ratio

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        vs, ts = [], []
        for grp, ws, gs in zip(self.groups, w, g):
            pairs = [self.ascent(grp, wi, gi) for wi, gi in zip(ws, gs)]
            vs.append([v for v, _ in pairs])
            ts.append([t for _, t in pairs])
        norm = global_norm(vs)
        return [
            [self.rho_t(i, grp) * t * v / (norm + grp["norm_eps"]) for v, t in zip(vgroup, tgroup)]
            for i, (grp, vgroup, tgroup) in enumerate(zip(self.groups, vs, ts))
        ]

    def direction(self, w: Nested, g: Nested, gp: Nested) -> Nested:
        inner = sum((gi * gpi).sum() for gs, gps in zip(g, gp) for gi, gpi in zip(gs, gps))
        gp_sq = global_norm(gp) ** 2
        out = []
        for grp, gs, gps in zip(self.groups, g, gp):
            c = inner / (gp_sq + grp["norm_eps"])
            out.append([gpi - grp["alpha"] * (gi - c * gpi) for gi, gpi in zip(gs, gps)])
        return out

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        if self.t == 0:
            for i, bg in enumerate(self.base.param_groups):
                self.first_lr[i] = bg["lr"]


class RefFisherSAM(Reference):
    """Fisher SAM (§6): eps_i = rho (g_i/(1+eta g_i^2)) / (sqrt(sum_j g_j^2/(1+eta g_j^2)) + eps0)."""

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        total = torch.zeros((), dtype=torch.float64)
        for grp, gs in zip(self.groups, g):
            for gi in gs:
                total = total + (gi.double() ** 2 / (1 + grp["eta"] * gi.double() ** 2)).sum()
        norm = total.sqrt()
        return [
            [grp["rho"] * (gi / (1 + grp["eta"] * gi**2)) / (norm + grp["norm_eps"]) for gi in gs]
            for grp, gs in zip(self.groups, g)
        ]


class RefFriendlySAM(Reference):
    """FriendlySAM (§9): v = g - sigma m_{t-1} (v = g on the first step),
    eps = rho v/(||v|| + eps0); after the step m = lam m + (1-lam) g (m_1 = g)."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        super().__init__(groups, base)
        self.m: Nested | None = None

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        if self.m is None:
            v = [[gi.clone() for gi in gs] for gs in g]
        else:
            v = [[gi - grp["sigma"] * mi for gi, mi in zip(gs, ms)] for grp, gs, ms in zip(self.groups, g, self.m)]
        norm = global_norm(v)
        return [[grp["rho"] * vi / (norm + grp["norm_eps"]) for vi in vs] for grp, vs in zip(self.groups, v)]

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        if self.m is None:
            self.m = [[gi.clone() for gi in gs] for gs in g]
        else:
            self.m = [
                [grp["lam"] * mi + (1 - grp["lam"]) * gi for gi, mi in zip(gs, ms)]
                for grp, gs, ms in zip(self.groups, g, self.m)
            ]


class RefVaSSO(Reference):
    """VaSSO (§9): d_t = (1-theta) d_{t-1} + theta g (d_1 = g), eps = rho d_t/(||d_t|| + eps0)."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        super().__init__(groups, base)
        self.d: Nested | None = None
        self.d_new: Nested | None = None

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        if self.d is None:
            self.d_new = [[gi.clone() for gi in gs] for gs in g]
        else:
            self.d_new = [
                [(1 - grp["theta"]) * di + grp["theta"] * gi for gi, di in zip(gs, ds)]
                for grp, gs, ds in zip(self.groups, g, self.d)
            ]
        norm = global_norm(self.d_new)
        return [[grp["rho"] * di / (norm + grp["norm_eps"]) for di in ds] for grp, ds in zip(self.groups, self.d_new)]

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        self.d = self.d_new


REFERENCES.update(
    {
        "wsam": RefWSAM,
        "gsam": RefGSAM,
        "fisher_sam": RefFisherSAM,
        "friendly_sam": RefFriendlySAM,
        "vasso": RefVaSSO,
    }
)


# --------------------------------------------------------------------------
# LookSAM, SAM every k, AE-SAM, ESAM (ALGORITHMS.md §5, §7, §9). Method-wide
# options (k, layerwise, sam_fraction, decay, gain, gamma, seed) are read from
# the first group's hyperparameters.


class RefSAMEveryK(RefSAM):
    """SAM every k steps (§7, LookSAM with alpha = 0): a SAM step when
    t % k == 0 (t = steps taken), Base(w, g) otherwise."""

    def needs_second_pass(self, w: Nested, g: Nested) -> bool:
        return self.t % self.groups[0]["k"] == 0


class RefLookSAM(Reference):
    """LookSAM (§7). On t % k == 0: eps = rho g/(||g|| + eps0), g_s at w + eps,
    g_v = g_s - <g, g_s>/||g||^2 g (g_s where g = 0), Base(w, g_s). Otherwise
    Base(w, g + alpha ||g||/(||g_v|| + eps0) g_v) (g when there is no g_v yet).
    Global vectors, or per tensor with ``layerwise``."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        super().__init__(groups, base)
        self.gv: Nested | None = None
        self.gv_new: Nested | None = None

    def needs_second_pass(self, w: Nested, g: Nested) -> bool:
        return self.t % self.groups[0]["k"] == 0

    def perturbation(self, w: Nested, g: Nested) -> Nested:
        norm = global_norm(g)
        return [[grp["rho"] * gi / (norm + grp["norm_eps"]) for gi in gs] for grp, gs in zip(self.groups, g)]

    def direction(self, w: Nested, g: Nested, gp: Nested) -> Nested:
        # a g_v at rounding level (||g_v|| <= 4 eps_dtype ||g_s||) is set to 0
        if self.groups[0]["layerwise"]:
            self.gv_new = []
            for grp, gs, gps in zip(self.groups, g, gp):
                out = []
                for gi, gpi in zip(gs, gps):
                    g_sq = (gi * gi).sum()
                    gv = gpi - ((gi * gpi).sum() / g_sq if g_sq > 0 else 0.0) * gi
                    tol = 4 * torch.finfo(gv.dtype).eps
                    out.append(gv if gv.norm() > tol * gpi.norm() else torch.zeros_like(gv))
                self.gv_new.append(out)
        else:
            inner = sum((gi * gpi).sum() for gs, gps in zip(g, gp) for gi, gpi in zip(gs, gps))
            g_sq = global_norm(g) ** 2
            c = inner / g_sq if g_sq > 0 else 0.0
            self.gv_new = [[gpi - c * gi for gi, gpi in zip(gs, gps)] for gs, gps in zip(g, gp)]
            tol = 4 * max(torch.finfo(t.dtype).eps for ts in gp for t in ts)
            if global_norm(self.gv_new) <= tol * global_norm(gp):
                self.gv_new = [[torch.zeros_like(t) for t in ts] for ts in self.gv_new]
        return gp

    def direction_single(self, w: Nested, g: Nested) -> Nested:
        if self.gv is None:
            return g
        if self.groups[0]["layerwise"]:
            return [
                [
                    gi + grp["alpha"] * gi.norm() / (gvi.norm() + grp["norm_eps"]) * gvi
                    for gi, gvi in zip(gs, gvs)
                ]
                for grp, gs, gvs in zip(self.groups, g, self.gv)
            ]
        gn, gvn = global_norm(g), global_norm(self.gv)
        return [
            [gi + grp["alpha"] * gn / (gvn + grp["norm_eps"]) * gvi for gi, gvi in zip(gs, gvs)]
            for grp, gs, gvs in zip(self.groups, g, self.gv)
        ]

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        if gp is not None:
            self.gv = self.gv_new


class RefAESAM(RefSAM):
    """AE-SAM (§9) with our threshold controller: x = ||g||^2,
    mu = decay mu + (1-decay) x, var = decay var + (1-decay)(x - mu)^2
    (first step: mu = x, var = 0); SAM step iff x >= mu + c sqrt(var)
    (always for r = 1, never for r = 0); after the step c += gain (s - r),
    c_0 = Phi^-1(1 - r)."""

    def __init__(self, groups: list[dict[str, Any]], base: torch.optim.Optimizer) -> None:
        super().__init__(groups, base)
        r = groups[0]["sam_fraction"]
        self.mu, self.var = 0.0, 0.0
        self.c = NormalDist().inv_cdf(1 - r) if 0 < r < 1 else 0.0
        self.pending: tuple[float, float, bool] | None = None
        self.decisions: list[bool] = []

    def needs_second_pass(self, w: Nested, g: Nested) -> bool:
        grp = self.groups[0]
        r, delta = grp["sam_fraction"], grp["decay"]
        x = sum(float((gi.double() ** 2).sum()) for gs in g for gi in gs)
        if self.t == 0:
            mu, var = x, 0.0
        else:
            mu = delta * self.mu + (1 - delta) * x
            var = delta * self.var + (1 - delta) * (x - mu) ** 2
        sam = True if r == 1 else False if r == 0 else x >= mu + self.c * math.sqrt(var)
        self.pending = (mu, var, sam)
        return sam

    def after_base_step(self, w: Nested, g: Nested, gp: Nested | None) -> None:
        assert self.pending is not None
        self.mu, self.var, sam = self.pending
        grp = self.groups[0]
        self.c += grp["gain"] * (float(sam) - grp["sam_fraction"])
        self.decisions.append(sam)


def esam_step_seed(seed: int, step: int) -> int:
    """SplitMix64 of seed + (step + 1) * 0x9E3779B97F4A7C15 (mod 2^64), cut to
    63 bits: the seed of step ``step``'s tensor mask (docs/methods/esam.md)."""
    m64 = 2**64
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) % m64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % m64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % m64
    return (z ^ (z >> 31)) % 2**63


class RefESAM(Reference):
    """ESAM (§5, our decisions). Mask: u = torch.rand(n_tensors, float64) from
    a generator seeded with esam_step_seed(seed, t), tensor j (every group's
    parameters in order) active iff u_j < beta of its group. Clean pass on
    every tensor (the masked ones' gradients are simply not used);
    eps_j = (rho/beta) g_j/(||g_active|| + eps0) on active tensors, 0 elsewhere.
    With per-sample losses and gamma < 1: a no-grad forward at w + eps, the
    max(1, floor(gamma n)) samples of largest l(w + eps) - l(w) in batch order,
    g_p = grad of their mean loss at w + eps. Base(w, g_p)."""

    def _active(self) -> dict[int, bool]:
        grp0 = self.groups[0]
        everything = [(grp, p) for grp in self.groups for p in grp["params"]]
        if all(grp["beta"] >= 1 for grp, _ in everything):
            return {id(p): True for _, p in everything}
        gen = torch.Generator().manual_seed(esam_step_seed(grp0["seed"], self.t))
        u = torch.rand(len(everything), generator=gen, dtype=torch.float64)
        return {id(p): bool(u[j] < grp["beta"]) for j, (grp, p) in enumerate(everything)}

    def _shard(self, closure: Callable[..., Tensor], active: dict[int, bool]) -> tuple[Tensor, Nested, Nested]:
        """Clean pass, eps, (selection,) perturbed pass, restore: (loss, params, g_p)."""
        grp0 = self.groups[0]
        self.base.zero_grad()
        out = closure()
        per_sample = out.dim() == 1
        if per_sample:
            out.mean().backward()
        params = [[p for p in grp["params"] if p.grad is not None] for grp in self.groups]
        w = [[p.detach().clone() for p in ps] for ps in params]
        g = [[p.grad.detach().clone() for p in ps] for ps in params]
        norm = torch.zeros((), dtype=torch.float64)
        for ps, gs in zip(params, g):
            for p, gi in zip(ps, gs):
                if active[id(p)]:
                    norm = norm + (gi.double() ** 2).sum()
        norm = norm.sqrt()
        with torch.no_grad():
            for grp, ps, gs in zip(self.groups, params, g):
                for p, gi in zip(ps, gs):
                    if active[id(p)]:
                        p.copy_(p + grp["rho"] / grp["beta"] * gi / (norm + grp["norm_eps"]))
        if per_sample:
            n = out.numel()
            keep = max(1, math.floor(grp0["gamma"] * n))
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
        with torch.no_grad():
            for ps, ws in zip(params, w):
                for p, w0 in zip(ps, ws):
                    p.copy_(w0)
        return loss, params, gp

    def _base_step(self, params: Nested, d: Nested) -> None:
        for ps, ds in zip(params, d):
            for p, di in zip(ps, ds):
                p.grad = di.clone()
        self.base.step()
        self.t += 1

    def step(self, closure: Callable[..., Tensor]) -> Tensor:
        loss, params, gp = self._shard(closure, self._active())
        self._base_step(params, gp)
        return loss

    def sharded_step(self, closures: list[Callable[..., Tensor]]) -> Tensor:
        """m-sharpness: the step's one mask, each shard's own eps and
        selection, g_p the mean over shards."""
        active = self._active()
        results = [self._shard(closure, active) for closure in closures]
        self._base_step(results[-1][1], _mean_nested([gp for _, _, gp in results]))
        return sum(loss.detach() for loss, _, _ in results) / len(results)


REFERENCES.update(
    {
        "looksam": RefLookSAM,
        "sam_every_k": RefSAMEveryK,
        "ae_sam": RefAESAM,
        "esam": RefESAM,
    }
)
