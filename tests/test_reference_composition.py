"""Internal consistency of tests/reference.py, without the library.

* every registered entry of REFERENCES, now a product of (ascent chain,
  combine, schedule), takes the same steps as the hand-written reference
  class it replaced (kept below, privately, as ``_Old*``) on every
  configuration of methods_db.CASES, through ``step`` and ``sharded_step``;
* the special cases the products promise (WSAM gamma = 0.5 coupled is SAM,
  GSAM alpha = 0 is SAM, k = 1 is always, ...) and Momentum-SAM's formula
  written out by hand;
* every valid product runs 4 steps on a tiny float64 MLP under SGD with
  momentum and Adam, and the momentum products perturb from the second step
  on with ||eps|| = rho (||T_w^-1 eps|| = rho with ASAM);
* compose_reference refuses the invalid products.

Nothing here imports flatminima.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable

import pytest
import torch
from torch import Tensor, nn

from methods_db import CASES, Case
from reference import (
    PRODUCT_HPARAMS,
    REFERENCES,
    VALID_PRODUCTS,
    Reference,
    centralize,
    compose_reference,
    esam_step_seed,
    global_norm,
    product_hparams,
    valid_products,
)

Nested = list[list[Tensor]]
DTYPE = torch.float64
TOL = 1e-12


# ------------------------------------------------------------- tiny problem


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 3)).to(DTYPE)


def data(n: int, features: int, seed: int = 1, size: int = 16) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, features, generator=g, dtype=DTYPE), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)]


def make_closure(base: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor, kind: str = "loss") -> Callable[..., Tensor]:
    if kind == "per_sample":

        def per_sample(indices: Tensor | None = None) -> Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return nn.functional.cross_entropy(model(xb), yb, reduction="none")

        return per_sample

    def closure() -> Tensor:
        base.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def split(model: nn.Module) -> list[list[nn.Parameter]]:
    """Weights, biases."""
    named = list(model.named_parameters())
    return [[p for n, p in named if n.endswith("weight")], [p for n, p in named if not n.endswith("weight")]]


BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-3}),
}


def build(
    cls: type, hparams: list[dict[str, Any]], base: str, model_fn: Callable[[], nn.Module] = mlp
) -> tuple[nn.Module, Any]:
    model = model_fn()
    base_cls, base_kwargs = BASES[base]
    params = split(model)
    groups = [{"params": ps, **h} for ps, h in zip(params, hparams)]
    ref_base = base_cls([{"params": ps} for ps in params], **base_kwargs)
    return model, cls(groups, ref_base)


def weights(model: nn.Module) -> list[Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[Tensor], b: list[Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def run(
    cls: type,
    hparams: list[dict[str, Any]],
    base: str,
    steps: int,
    kind: str = "loss",
    shards: int = 0,
    scheduler: Callable[[torch.optim.Optimizer], Any] | None = None,
    model_fn: Callable[[], nn.Module] = mlp,
    features: int = 6,
) -> tuple[list[list[Tensor]], Any]:
    """Weights after each step (and the reference)."""
    model, ref = build(cls, hparams, base, model_fn)
    sched = None if scheduler is None else scheduler(ref.base)
    out = []
    for i, (x, y) in enumerate(data(steps, features)):
        torch.manual_seed(1000 + i)
        if shards:
            closures = [make_closure(ref.base, model, xb, yb, kind) for xb, yb in zip(x.chunk(shards), y.chunk(shards))]
            ref.sharded_step(closures)
        else:
            ref.step(make_closure(ref.base, model, x, y, kind))
        if sched is not None:
            sched.step()
        out.append(weights(model))
    return out, ref


def assert_same_run(a: list[list[Tensor]], b: list[list[Tensor]], label: str, tol: float = TOL) -> None:
    for i, (wa, wb) in enumerate(zip(a, b)):
        diff = max_diff(wa, wb)
        assert diff <= tol, f"{label}: step {i + 1}: max |w - w'| = {diff:.3e}"


# ---------------------------------------------------------------------------
# The hand-written references the products replaced (tests/reference.py
# before the three axes), unchanged but for their names.


class _OldReference:
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
            gp = _old_gradient_at(params, w, self.perturbation(w, g), closure)
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
        g = _old_mean_nested(gs)
        gp = None
        if self.needs_second_pass(w, g):
            gps = [_old_gradient_at(params, w, self.perturbation(w, g_s), c) for c, g_s in zip(closures, gs)]
            self.perturbation(w, g)  # the state it records: that of the mean gradient
            gp = _old_mean_nested(gps)
            d = self.direction(w, g, gp)
        else:
            d = self.direction_single(w, g)
        self._descend(params, g, gp, d)
        return sum(losses) / n


def _old_gradient_at(params: Nested, w: Nested, eps: Nested, closure: Callable[[], Tensor]) -> Nested:
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


def _old_mean_nested(values: list[Nested]) -> Nested:
    n = len(values)
    return [[sum(parts) / n for parts in zip(*groups)] for groups in zip(*values)]


class _OldSAM(_OldReference):
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


def _old_lr(base: torch.optim.Optimizer, i: int) -> float:
    return base.param_groups[i]["lr"]


class _OldWSAM(_OldSAM):
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
                a, lr = self.alpha(grp), _old_lr(self.base, i)
                for j in range(len(ws)):
                    ws[j] = ws[j] - lr * a * (gps[j] - gs[j])


class _OldGSAM(_OldSAM):
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


class _OldFisherSAM(_OldReference):
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


class _OldFriendlySAM(_OldReference):
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


class _OldVaSSO(_OldReference):
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


class _OldSAMEveryK(_OldSAM):
    """SAM every k steps (§7, LookSAM with alpha = 0): a SAM step when
    t % k == 0 (t = steps taken), Base(w, g) otherwise."""

    def needs_second_pass(self, w: Nested, g: Nested) -> bool:
        return self.t % self.groups[0]["k"] == 0


class _OldLookSAM(_OldReference):
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


class _OldAESAM(_OldSAM):
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


class _OldESAM(_OldReference):
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
        self._base_step(results[-1][1], _old_mean_nested([gp for _, _, gp in results]))
        return sum(loss.detach() for loss, _, _ in results) / len(results)



OLD: dict[str, type] = {
    "sam": _OldSAM,
    "asam": _OldSAM,
    "gcsam": _OldSAM,
    "wsam": _OldWSAM,
    "gsam": _OldGSAM,
    "fisher_sam": _OldFisherSAM,
    "friendly_sam": _OldFriendlySAM,
    "vasso": _OldVaSSO,
    "looksam": _OldLookSAM,
    "sam_every_k": _OldSAMEveryK,
    "ae_sam": _OldAESAM,
    "esam": _OldESAM,
}


# ------------------------------------------------------ entries vs old classes


def case_groups(case: Case) -> list[dict[str, Any]]:
    return [dict(case.ref_hparams), {**case.ref_hparams, **case.second_group}]


def test_every_old_entry_is_compared() -> None:
    assert set(REFERENCES) == set(OLD) | {"momentum_sam"}
    assert {c.method for c in CASES} <= set(OLD) | {"momentum_sam"}  # new: checked by hand below


def test_entries_are_the_documented_products() -> None:
    sam_like = (("centralize", "asam"), "sam")
    expected = {
        "sam": (*sam_like, "always"),
        "asam": (*sam_like, "always"),
        "gcsam": (*sam_like, "always"),
        "wsam": (("asam",), "wsam", "always"),
        "gsam": (("asam",), "gsam", "always"),
        "fisher_sam": (("fisher",), "sam", "always"),
        "friendly_sam": (("friendly",), "sam", "always"),
        "vasso": (("vasso",), "sam", "always"),
        "looksam": ((), "looksam", "every_k"),
        "sam_every_k": (*sam_like, "every_k"),
        "ae_sam": (*sam_like, "ae_sam"),
        "esam": (("esam",), "sam", "always"),
        "momentum_sam": (("momentum",), "sam", "always"),
    }
    for name, product in expected.items():
        assert REFERENCES[name].product == product, name  # type: ignore[attr-defined]
        assert issubclass(REFERENCES[name], Reference)


#: every case under SGD with momentum (and sharded); each method's default case under Adam too
OLD_RUNS = [(c, "sgd-momentum") for c in CASES if c.method in OLD] + [
    (c, "adam") for c in CASES if c.id == c.method and c.method in OLD
]


@pytest.mark.parametrize("case, base", OLD_RUNS, ids=lambda v: v.id if isinstance(v, Case) else v)
def test_entry_matches_old_class(case: Case, base: str) -> None:
    """Each configuration of the database, 3 steps with two groups, with the
    case's closure form and LR schedule; and sharded over 2 shards."""
    hparams = case_groups(case)
    kw: dict[str, Any] = {"kind": case.closure, "scheduler": case.scheduler, "model_fn": tiny_mlp, "features": 4}
    new, ref = run(REFERENCES[case.method], hparams, base, 3, **kw)
    old, _ = run(OLD[case.method], hparams, base, 3, **kw)
    assert_same_run(new, old, f"{case.id}/{base}")
    assert max_diff(new[-1], weights(tiny_mlp())) > 1e-4
    if base == "sgd-momentum":
        new, _ = run(REFERENCES[case.method], hparams, base, 3, shards=2, **kw)
        old, _ = run(OLD[case.method], hparams, base, 3, shards=2, **kw)
        assert_same_run(new, old, f"{case.id}/{base}/sharded")


def test_ae_sam_decisions_match_old() -> None:
    case = next(c for c in CASES if c.method == "ae_sam")
    _, new = run(REFERENCES["ae_sam"], case_groups(case), "sgd-momentum", 6)
    _, old = run(_OldAESAM, case_groups(case), "sgd-momentum", 6)
    assert new.schedule.decisions == old.decisions == new.decisions
    assert True in new.decisions and False in new.decisions


# ------------------------------------------------------------ special cases

_BASE_H = {"rho": 0.1, "norm_eps": 1e-12}


def _same(a: tuple[list[str], str, str], ha: dict[str, Any], b: tuple[list[str], str, str] | None, hb: dict[str, Any],
          base: str = "sgd-momentum", steps: int = 3, second: dict[str, Any] | None = None) -> None:
    """Product a with groups ha equals product b with hb (b None: the plain base optimizer)."""
    second = second or {}
    out_a, _ = run(compose_reference(*a), [ha, {**ha, **second}], base, steps)
    if b is None:
        model = mlp()
        base_cls, kw = BASES[base]
        opt = base_cls([{"params": ps} for ps in split(model)], **kw)
        out_b = []
        for i, (x, y) in enumerate(data(steps, 6)):
            make_closure(opt, model, x, y)()
            opt.step()
            out_b.append(weights(model))
    else:
        out_b, _ = run(compose_reference(*b), [hb, {**hb, **second}], base, steps)
    assert_same_run(out_a, out_b, f"{a} vs {b}")


@pytest.mark.parametrize("adaptive", [False, True])
def test_wsam_gamma_half_coupled_is_sam(adaptive: bool) -> None:
    asam = {"adaptive": adaptive, "eta": 0.01}
    _same((["asam"], "wsam", "always"), {**_BASE_H, **asam, "gamma": 0.5, "decouple": False},
          (["asam"], "sam", "always"), {**_BASE_H, **asam})


def test_wsam_gamma0_is_base_and_runs_no_perturbed_pass() -> None:
    h = {**_BASE_H, "gamma": 0.0, "decouple": True}
    _same(([], "wsam", "always"), h, None, {})
    _, ref = run(compose_reference([], "wsam", "always"), [h, h], "sgd-momentum", 2)
    assert ref.decisions == [False, False]


def test_gsam_alpha0_is_sam() -> None:
    gsam = {"rho_min": None, "alpha": 0.0, "lr_max": None, "lr_min": None}
    _same(([], "gsam", "always"), {**_BASE_H, **gsam}, ([], "sam", "always"), _BASE_H)
    # rho_min = rho: rho_t = rho whatever the lr
    _same(([], "gsam", "always"), {**_BASE_H, **gsam, "rho_min": 0.1}, ([], "sam", "always"), _BASE_H)


def test_gsam_rho_t_follows_the_lr_and_esam_divides_it() -> None:
    h = {**_BASE_H, "rho_min": 0.02, "alpha": 0.3, "lr_max": 0.2, "lr_min": 0.0}
    model, ref = build(compose_reference([], "gsam", "always"), [h, h], "sgd-momentum")
    x, y = data(1, 6)[0]
    ref.step(make_closure(ref.base, model, x, y))  # lr 0.1: rho_t = 0.02 + 0.08 * 0.5
    assert abs(global_norm(ref.last_eps) - 0.06) <= 1e-12
    model, ref = build(compose_reference(["esam"], "gsam", "always"), [{**h, "beta": 1.0, "seed": 0}] * 2, "sgd-momentum")
    ref.step(make_closure(ref.base, model, x, y))
    assert abs(global_norm(ref.last_eps) - 0.06) <= 1e-12


def test_every_k1_and_ae_sam_r1_are_always() -> None:
    _same(([], "sam", "every_k"), {**_BASE_H, "k": 1}, ([], "sam", "always"), _BASE_H)
    ae = {"sam_fraction": 1.0, "decay": 0.9, "gain": 0.05}
    _same((["asam"], "sam", "ae_sam"), {**_BASE_H, **ae, "adaptive": True, "eta": 0.01},
          (["asam"], "sam", "always"), {**_BASE_H, "adaptive": True, "eta": 0.01})


def test_ae_sam_r0_is_base() -> None:
    _same(([], "sam", "ae_sam"), {**_BASE_H, "sam_fraction": 0.0, "decay": 0.9, "gain": 0.05}, None, {})


def test_looksam_special_cases() -> None:
    look = {"alpha": 0.7, "layerwise": False}
    # every step perturbed: LookSAM is SAM
    _same(([], "looksam", "every_k"), {**_BASE_H, **look, "k": 1}, ([], "sam", "always"), _BASE_H)
    _same(([], "looksam", "always"), {**_BASE_H, **look}, ([], "sam", "always"), _BASE_H)
    # alpha = 0: SAM every k
    _same(([], "looksam", "every_k"), {**_BASE_H, **look, "alpha": 0.0, "k": 3},
          ([], "sam", "every_k"), {**_BASE_H, "k": 3}, steps=5)


def test_ascent_special_cases_are_sam() -> None:
    sam = ([], "sam", "always")
    _same((["fisher"], "sam", "always"), {**_BASE_H, "eta": 0.0}, sam, _BASE_H)
    _same((["friendly"], "sam", "always"), {**_BASE_H, "sigma": 0.0, "lam": 0.9}, sam, _BASE_H)
    _same((["vasso"], "sam", "always"), {**_BASE_H, "theta": 1.0}, sam, _BASE_H)
    _same((["esam"], "sam", "always"), {**_BASE_H, "beta": 1.0, "seed": 3}, sam, _BASE_H)
    _same((["centralize", "asam"], "sam", "always"), {**_BASE_H, "centralize": False, "adaptive": False}, sam, _BASE_H)
    _same((["sam"], "sam", "always"), _BASE_H, sam, _BASE_H)


def test_esam_entry_with_loss_closures_is_the_esam_product() -> None:
    h = {**_BASE_H, "beta": 0.5, "gamma": 1.0, "seed": 74}
    for base in BASES:
        a, _ = run(REFERENCES["esam"], [h, {**h, "beta": 0.8}], base, 3)
        b, _ = run(compose_reference(["esam"], "sam", "always"), [h, {**h, "beta": 0.8}], base, 3)
        assert_same_run(a, b, f"esam/{base}")


def test_wsam_decoupled_by_hand() -> None:
    """Two steps of plain SGD: w1 = w0 - lr g0 - lr alpha (g_p0 - g0), ..."""
    h = {**_BASE_H, "gamma": 0.75, "decouple": True}
    out, _ = run(compose_reference([], "wsam", "always"), [h, h], "sgd-momentum", 2)
    model = mlp()
    params = [p for ps in split(model) for p in ps]
    buf = None
    for (x, y), expected in zip(data(2, 6), out):
        g, gp, eps = _sam_gradients(model, params, x, y, 0.1)
        buf = g if buf is None else [0.9 * b + gi for b, gi in zip(buf, g)]
        with torch.no_grad():
            for p, b, gi, gpi in zip(params, buf, g, gp):
                p.copy_(p - 0.1 * b - 0.1 * 3.0 * (gpi - gi))
        assert max_diff(weights(model), expected) <= TOL


def _sam_gradients(model: nn.Module, params: list[Tensor], x: Tensor, y: Tensor, rho: float):
    def grad_at() -> list[Tensor]:
        loss = nn.functional.cross_entropy(model(x), y)
        return list(torch.autograd.grad(loss, params))

    g = grad_at()
    n = torch.sqrt(sum((gi**2).sum() for gi in g))
    eps = [rho * gi / (n + 1e-12) for gi in g]
    w = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, e in zip(params, eps):
            p.add_(e)
    gp = grad_at()
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    return g, gp, eps


# -------------------------------------------------------------- momentum-SAM


def test_momentum_sam_by_hand() -> None:
    """SGD(lr, momentum mu): step 1 a plain step at w (no buffer yet);
    then eps = -rho b/||b||, g_p at w + eps, b = mu b + g_p, w -= lr b."""
    rho, lr, mu = 0.5, 0.1, 0.9
    h = {"rho": rho, "norm_eps": 1e-12}
    out, ref = run(REFERENCES["momentum_sam"], [h, h], "sgd-momentum", 3)
    assert ref.decisions == [False, True, True]
    model = mlp()
    params = [p for ps in split(model) for p in ps]
    buf: list[Tensor] | None = None
    for (x, y), expected in zip(data(3, 6), out):
        w = [p.detach().clone() for p in params]
        if buf is not None:
            n = torch.sqrt(sum((b**2).sum() for b in buf))
            with torch.no_grad():
                for p, b in zip(params, buf):
                    p.copy_(p - rho * b / (n + 1e-12))
        loss = nn.functional.cross_entropy(model(x), y)
        grads = torch.autograd.grad(loss, params)
        buf = list(grads) if buf is None else [mu * b + gi for b, gi in zip(buf, grads)]
        with torch.no_grad():
            for p, wi, b in zip(params, w, buf):
                p.copy_(wi - lr * b)
        assert max_diff(weights(model), expected) <= TOL


def test_momentum_sam_one_closure_call_and_its_loss() -> None:
    h = {"rho": 0.5, "norm_eps": 1e-12}
    model, ref = build(REFERENCES["momentum_sam"], [h, h], "adam")
    calls = []
    for x, y in data(3, 6):
        inner = make_closure(ref.base, model, x, y)

        def closure() -> Tensor:
            w_now = weights(model)
            loss = inner()
            calls.append((w_now, loss.detach()))
            return loss

        w_before = weights(model)
        n0 = len(calls)
        loss = ref.step(closure)
        assert len(calls) == n0 + 1
        assert torch.equal(loss.detach(), calls[-1][1])
        if ref.decisions[-1]:  # the call ran at w + eps
            assert max_diff(calls[-1][0], w_before) > 1e-3
        else:
            assert max_diff(calls[-1][0], w_before) == 0.0
    assert ref.decisions == [False, True, True]


def test_momentum_without_buffer_is_base() -> None:
    """Plain SGD keeps no momentum buffer: Momentum-SAM never perturbs."""
    h = {"rho": 0.5, "norm_eps": 1e-12}
    model, ref = build(REFERENCES["momentum_sam"], [h, h], "sgd-momentum")
    ref.base = torch.optim.SGD([{"params": ps} for ps in split(model)], lr=0.1)
    plain = mlp()
    opt = torch.optim.SGD([{"params": ps} for ps in split(plain)], lr=0.1)
    for x, y in data(3, 6):
        ref.step(make_closure(ref.base, model, x, y))
        make_closure(opt, plain, x, y)()
        opt.step()
    assert ref.decisions == [False] * 3
    assert max_diff(weights(model), weights(plain)) == 0.0


# ------------------------------------------------------------ every product


def product_id(product: tuple[tuple[str, ...], str, str]) -> str:
    chain, combine, schedule = product
    return f"{'+'.join(chain) or '-'}|{combine}|{schedule}"


def test_valid_products_are_the_documented_set() -> None:
    chains = {(), ("asam",), ("centralize",), ("fisher",), ("friendly",), ("vasso",), ("esam",), ("momentum",), ("momentum", "asam")}
    expected = set()
    for chain in chains:
        for combine in ("sam", "wsam", "gsam", "looksam"):
            for schedule in ("always", "every_k", "ae_sam"):
                if "momentum" in chain and (combine != "sam" or schedule == "ae_sam"):
                    continue
                if "esam" in chain and combine == "wsam":
                    continue
                expected.add((chain, combine, schedule))
    assert set(VALID_PRODUCTS) == expected and len(VALID_PRODUCTS) == len(expected) == 85
    assert [(tuple(a), c, s) for a, c, s in valid_products()] == VALID_PRODUCTS
    for chain, combine, schedule in VALID_PRODUCTS:
        for part in (*chain, combine, schedule):
            assert part in PRODUCT_HPARAMS


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("product", VALID_PRODUCTS, ids=product_id)
def test_every_valid_product_runs(product: tuple[tuple[str, ...], str, str], base: str) -> None:
    chain, combine, schedule = product
    h = product_hparams(chain, combine, schedule)
    cls = compose_reference(list(chain), combine, schedule)
    model, ref = build(cls, [h, dict(h)], base, tiny_mlp)
    w0 = weights(model)
    for i, (x, y) in enumerate(data(4, 4)):
        w_before = [p.detach().clone() for ps in split(model) for p in ps]  # the order of last_eps
        ref.last_eps = None
        loss = ref.step(make_closure(ref.base, model, x, y))
        assert torch.isfinite(loss)
        assert all(torch.isfinite(w).all() for w in weights(model))
        assert ref.decisions[-1] == (ref.last_eps is not None)
        if "momentum" in chain:
            scheduled = schedule == "always" or i % h["k"] == 0
            assert ref.decisions[-1] == (i >= 1 and scheduled), f"step {i + 1}: {ref.decisions}"
            if ref.decisions[-1]:
                eps = [e for es in ref.last_eps for e in es]
                if "asam" in chain:
                    eps = [e / (w.abs() + h["eta"]) for e, w in zip(eps, w_before)]
                norm = float(torch.sqrt(sum((e**2).sum() for e in eps)))
                assert abs(norm - h["rho"]) <= 1e-9 * h["rho"], f"step {i + 1}: ||eps|| = {norm}"
    assert ref.t == 4
    assert max_diff(weights(model), w0) > 1e-4
    if schedule == "always" and "momentum" not in chain and combine != "wsam":
        assert ref.decisions == [True] * 4
    if schedule == "every_k" and "momentum" not in chain:
        assert ref.decisions == [True, False, True, False]


@pytest.mark.parametrize("product", [p for p in VALID_PRODUCTS if p[0] in ((), ("momentum",))], ids=product_id)
def test_products_shard(product: tuple[tuple[str, ...], str, str]) -> None:
    """sharded_step with one shard is step."""
    chain, combine, schedule = product
    h = product_hparams(chain, combine, schedule)
    cls = compose_reference(list(chain), combine, schedule)
    a, _ = run(cls, [h, h], "sgd-momentum", 3, model_fn=tiny_mlp, features=4)
    b, _ = run(cls, [h, h], "sgd-momentum", 3, shards=1, model_fn=tiny_mlp, features=4)
    assert_same_run(a, b, product_id(product), tol=0.0)
    run(cls, [h, h], "adam", 3, shards=2, model_fn=tiny_mlp, features=4)


# ----------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "ascent, combine, schedule, match",
    [
        (["momentum"], "wsam", "always", "no clean pass"),
        (["momentum"], "gsam", "always", "no clean pass"),
        (["momentum"], "looksam", "every_k", "no clean pass"),
        (["momentum"], "sam", "ae_sam", "no clean pass"),
        (["momentum", "fisher"], "sam", "always", "no clean pass"),
        (["momentum", "friendly"], "sam", "always", "no clean pass"),
        (["momentum", "vasso"], "sam", "always", "no clean pass"),
        (["asam", "momentum"], "sam", "always", "must come first"),
        (["fisher", "asam"], "sam", "always", "eta"),
        (["esam"], "wsam", "always", "gamma"),
        (["asam", "asam"], "sam", "always", "twice"),
        (["nope"], "sam", "always", "unknown ascent"),
        ([], "nope", "always", "unknown combine"),
        ([], "sam", "nope", "unknown schedule"),
    ],
)
def test_invalid_products_are_refused(ascent: list[str], combine: str, schedule: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        compose_reference(ascent, combine, schedule)


def test_products_read_keys_without_defaults() -> None:
    """Outside the legacy entries a missing key is an error, not a default."""
    model, ref = build(compose_reference(["asam"], "sam", "always"), [{"rho": 0.1, "norm_eps": 1e-12}] * 2, "sgd-momentum")
    x, y = data(1, 6)[0]
    with pytest.raises(KeyError, match="adaptive"):
        ref.step(make_closure(ref.base, model, x, y))


def test_product_hparams_are_the_keys_the_parts_read() -> None:
    from reference import PART_KEYS

    for part, hparams in PRODUCT_HPARAMS.items():
        allowed = {"rho", "norm_eps"} | (PART_KEYS[part] if part != "common" else set())
        assert set(hparams) <= allowed, f"{part}: {sorted(set(hparams) - allowed)}"
    for part, keys in PART_KEYS.items():
        assert keys <= set(PRODUCT_HPARAMS[part]), f"{part}: a generated test would leave out {sorted(keys - set(PRODUCT_HPARAMS[part]))}"
