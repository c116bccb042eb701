"""flatminima against its peers, side by side (issue #15): ``python -m benchmarks.peers``.

The peers are pytorch_optimizer's SAM, ASAM (its SAM with ``adaptive=True``),
WSAM, GSAM, LookSAM and FriendlySAM, each used as its documentation shows:

* SAM, ASAM, LookSAM, FriendlySAM: ``closure(); opt.step(closure)`` (the
  clean pass outside ``step``), ``base_optimizer`` a class;
* WSAM: ``WSAM(model, params, SGD, ...)``, ``opt.step(closure)`` runs both passes;
* GSAM: an SGD instance, a ``ProportionScheduler`` (a constant ``rho``),
  ``set_closure(loss_fn, x, y)``, ``opt.step()``, ``opt.update_rho_t()``.

Ours are ``flatminima.create(name, params, SGD)`` with the registry defaults
and ``opt.step(closure)``. Hyperparameters that change the cost are the same
on both sides (``rho``, ``k = 5`` for LookSAM, SGD ``lr``, ``momentum``);
every variant trains its own copy of the weights (the same initial values).

Measured in one interleaved run (:func:`benchmarks.timing.round_robin`) per
model, with ``sgd`` (one pass + SGD) and ``floor`` (two passes + one SGD step)
as baselines of the same run:

* the full step: median and mean (a method with a perturbed pass every
  ``k``-th step is timed over 10 consecutive steps per sample; its mean is its
  cost, its median is a one-pass step);
* the bookkeeping: the step minus what its passes and base step cost, i.e.
  ``step - floor`` for two-pass methods and ``step - (sgd + (floor - sgd) / k)``
  for periodic ones (a ``1 + 1/k``-pass floor);
* peak extra memory: :mod:`benchmarks.peer_memory`, one fresh process per
  (library, method).

Every figure is printed as a ratio to a baseline of the same run.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima

from . import timing as TM
from .models import Workload, build_method, transformer_workload
from .report import table

LR = 1e-3
MOMENTUM = 0.9
K = 5  # LookSAM's period on both sides (pytorch_optimizer's default is 10, ours 5)
PERIODIC_INNER = 10
#: (our registry name, the peer's label); the peer's constructor is in :func:`build_peer`
PAIRS = (("sam", "SAM"), ("asam", "ASAM"), ("wsam", "WSAM"), ("gsam", "GSAM"),
         ("looksam", "LookSAM"), ("friendly_sam", "FriendlySAM"))
#: ours without a peer in pytorch_optimizer, timed for the periodic target of issue #15
OURS_ONLY = ("sam_every_k", "ae_sam")
PERIODIC = {"looksam", "sam_every_k", "ae_sam"}
# issue #15's targets (CPU, one thread)
SAM_BOOKKEEPING_VS_PEER = 0.5
SAM_VS_FLOOR = 1.05
SAM_MEMORY = 1.0
OTHER_MEMORY = 2.0
PERIODIC_VS_SGD = 1.25
#: the few MiB of small allocations any step makes, whatever its method (both libraries show them:
#: 1.02 for one copy, 2.02 for two, on a 128 MiB model); as benchmarks.run's own memory target
MEMORY_TOLERANCE = 0.03


def have_peers() -> bool:
    try:
        import pytorch_optimizer  # noqa: F401
    except ImportError:
        return False
    return True


def _rho(name: str) -> float:
    return float(flatminima.get_method(name).preset.get("rho", 0.05))


def build_peer(wl: Workload, name: str, *, foreach: bool | None = None) -> tuple[Any, Callable[[], Any]]:
    """pytorch_optimizer's ``name`` on ``wl`` and one step of it, as its docs show."""
    import pytorch_optimizer as po
    from pytorch_optimizer.lr_scheduler.proportion import ProportionScheduler

    params, sgd = wl.params, torch.optim.SGD
    kw: dict[str, Any] = dict(lr=LR, momentum=MOMENTUM)
    if name in ("sam", "asam"):
        opt = po.SAM(params, sgd, rho=_rho(name), adaptive=name == "asam", foreach=foreach, **kw)
    elif name == "looksam":
        opt = po.LookSAM(params, sgd, rho=_rho(name), k=K, alpha=0.7, foreach=foreach, **kw)
    elif name == "friendly_sam":
        opt = po.FriendlySAM(params, sgd, rho=_rho(name), sigma=1.0, lmbda=0.9, foreach=foreach, **kw)
    elif name == "wsam":
        opt = po.WSAM(wl.model, params, sgd, rho=_rho(name), gamma=0.9, foreach=foreach, **kw)
        clo = wl.closure_for(opt)
        return opt, lambda: opt.step(clo)
    elif name == "gsam":
        base = sgd(params, **kw)
        sched = ProportionScheduler(torch.optim.lr_scheduler.LambdaLR(base, lambda _: 1.0), max_lr=LR,
                                    min_lr=LR, max_value=_rho(name), min_value=_rho(name))
        opt = po.GSAM(params, base, wl.model, sched, alpha=0.4, foreach=foreach)
        opt.set_closure(F.cross_entropy, wl.x, wl.y)

        def gsam_step() -> None:
            opt.step()
            opt.update_rho_t()

        return opt, gsam_step
    else:
        raise ValueError(f"no pytorch_optimizer peer for {name!r}; peers: {[n for n, _ in PAIRS]}")
    clo = wl.closure_for(opt)

    def step() -> None:  # the clean pass first, then step(closure) runs the perturbed one
        clo()
        opt.step(clo)

    return opt, step


def workloads(device: torch.device, tiny: bool = False) -> list[Workload]:
    """The issue's three models: the experiments' MLP (6 tensors, 79k parameters) and ResNet1D
    with BatchNorm (47 tensors) on MNIST-1D-shaped inputs, and the benchmark's transformer."""
    from flatminima.experiments.models import build_model

    out = []
    for name, depth, width in (("mlp", 2, 32 if tiny else 256), ("resnet1d", 2, 4 if tiny else 32)):
        torch.manual_seed(0)
        model = build_model(name, (40,), 10, width=width, depth=depth).to(device)
        g = torch.Generator().manual_seed(1)
        batch = 8 if tiny else 128
        x, y = torch.randn(batch, 40, generator=g).to(device), torch.randint(0, 10, (batch,), generator=g).to(device)
        desc = f"flatminima.experiments {name} (width {width}, depth {depth}), MNIST-1D-shaped batch {batch} x 40"
        out.append(Workload(name, desc, model, x, y, {"batch": batch}))
    if tiny:
        out.append(transformer_workload(device, layers=2, d_model=16, nhead=2, seq=8, batch=4, vocab=50))
    else:
        out.append(transformer_workload(device))
    return out


def _copy(wl: Workload) -> Workload:
    """The same model and batch with weights of its own (each variant trains its copy)."""
    return Workload(wl.name, wl.description, copy.deepcopy(wl.model), wl.x, wl.y, wl.info)


def _variants(wl: Workload, methods: list[str], peers: bool, sync: Callable[[], None]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kind in ("sgd", "floor"):
        w = _copy(wl)
        sgd = torch.optim.SGD(w.params, lr=LR, momentum=MOMENTUM)
        clo = w.closure_for(sgd)
        out[kind] = (lambda c=clo, o=sgd: (c(), o.step())) if kind == "sgd" else (
            lambda c=clo, o=sgd: (c(), c(), o.step()))
    for name in methods:
        w = _copy(wl)
        _, fn, _ = build_method(w, name, torch.optim.SGD, None, sync, lr=LR, momentum=MOMENTUM)
        out[f"flatminima {name}"] = fn
        if peers and name in dict(PAIRS):
            w = _copy(wl)
            out[f"pytorch_optimizer {name}"] = build_peer(w, name)[1]
            if name == "sam":  # its batched path (foreach=None batches on CUDA only)
                w = _copy(wl)
                out["pytorch_optimizer sam foreach"] = build_peer(w, name, foreach=True)[1]
    return out


def bench_workload(wl: Workload, methods: list[str], *, peers: bool, reps: int, warmup: int, sample_s: float,
                   sync: Callable[[], None], progress: Callable[[str], None]) -> dict[str, Any]:
    info = wl.summary()
    progress(f"{wl.name}: {info['param_tensors']} tensors, {info['params']:,} parameters")
    fns = _variants(wl, methods, peers, sync)
    for f in fns.values():  # warm-up step each (the base optimizers' state exists from here on)
        f()
    sync()
    inner = TM.inner_for(TM.time_once(fns["floor"], sync), sample_s, cap=50)
    # a periodic method's sample spans whole periods (a multiple of k steps), so each sample is its mean cost
    periods = -(-max(inner, PERIODIC_INNER) // K) * K
    inner_of = {k: periods if k.split()[-1] in PERIODIC else inner for k in fns}
    samples = TM.round_robin(fns, reps=reps, warmup=warmup, inner=inner_of, sync=sync, progress=progress,
                             label=f"{wl.name}: ")
    st = {k: TM.summarize(v) for k, v in samples.items()}
    sgd_s, floor_s = samples["sgd"], samples["floor"]
    sgd = st["sgd"]["median"]
    rows: dict[str, Any] = {}
    for key, s in st.items():
        name = key.split()[1] if " " in key else key
        periodic = name in PERIODIC
        # the floor of this method in each rep: what its passes and one base step cost with nothing else
        own_floor = sgd_s if key == "sgd" else (
            [a + (b - a) / K for a, b in zip(sgd_s, floor_s)] if periodic else floor_s)
        extra = TM.quantiles([v - f for v, f in zip(samples[key], own_floor)])[1]
        rows[key] = {
            "median_ms": s["median"] * 1e3, "mean_ms": s["mean"] * 1e3, "iqr_ms": s["iqr"] * 1e3,
            "inner": inner_of[key], "periodic": periodic,
            "median_x_sgd": s["median"] / sgd, "mean_x_sgd": s["mean"] / st["sgd"]["mean"],
            # paired: median over reps of the ratio to the baseline timed in the same rep (load drift cancels)
            "x_sgd": TM.paired_ratio(samples[key], sgd_s)["median"],
            "x_floor": TM.paired_ratio(samples[key], floor_s)["median"],
            "bookkeeping_ms": extra * 1e3, "bookkeeping_x_sgd": extra / sgd,
        }
    return {"info": info, "inner": inner, "steps": rows}


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue #15's targets, each with the figures that decide it."""
    out: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float, detail: str) -> None:
        ok = value is not None and math.isfinite(value) and value <= limit
        out.append({"name": name, "value": value, "threshold": limit, "pass": ok, "detail": detail})

    wls = res["workloads"]
    mlp = wls.get("mlp", {}).get("steps", {})
    ours = mlp.get("flatminima sam")
    peer_bk = [v["bookkeeping_ms"] for k, v in mlp.items() if k.startswith("pytorch_optimizer sam")]
    if ours and peer_bk:
        best = min(peer_bk)
        add("SAM bookkeeping <= 0.5 x the fastest peer's (mlp)", ours["bookkeeping_ms"] / best if best > 0 else None,
            SAM_BOOKKEEPING_VS_PEER, f"{ours['bookkeeping_ms']:.3f} ms against {best:.3f} ms")
    for wname, w in wls.items():
        s = w["steps"].get("flatminima sam")
        if s:
            add(f"SAM step <= {SAM_VS_FLOOR} x floor ({wname})", s["x_floor"], SAM_VS_FLOOR,
                f"paired; ratio of medians {s['median_ms'] / w['steps']['floor']['median_ms']:.3f}")
            peer = w["steps"].get("pytorch_optimizer sam")
            if peer and w["info"]["param_tensors"] >= 47:
                add(f"SAM step <= the peer's ({wname})", s["x_floor"] / peer["x_floor"], 1.0,
                    f"paired x floor {s['x_floor']:.3f} against {peer['x_floor']:.3f}")
        for name in sorted(PERIODIC):
            p = w["steps"].get(f"flatminima {name}")
            if p:
                add(f"{name} mean step <= {PERIODIC_VS_SGD} x SGD ({wname})", p["x_sgd"], PERIODIC_VS_SGD,
                    f"paired, each sample the mean of {p['inner']} steps; ratio of means {p['mean_x_sgd']:.3f}")
    for name, m in (res.get("memory") or {}).get("ours", {}).items():
        limit = SAM_MEMORY if name == "sam" else OTHER_MEMORY
        value = m.get("peak_extra_x_params")
        add(f"{name} peak extra memory <= {limit} x params (+{MEMORY_TOLERANCE})",
            None if value is None else value - MEMORY_TOLERANCE, limit,
            f"measured {value if value is not None else math.nan:.3f}, of which held between steps "
            f"{m.get('held_x_params', math.nan):.2f}")
    return out


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    out = [f"flatminima against pytorch_optimizer {meta.get('pytorch_optimizer', '(not installed)')}  {meta['date']}  "
           f"torch {torch.__version__}, device {meta['device']}, {meta['threads']} thread(s), {meta['reps']} "
           "interleaved reps" + ("  [QUICK: numbers not meaningful]" if meta["quick"] else "")]
    out.append("median/mean x SGD: ratios of the medians/means over samples; paired x SGD/floor: median over reps "
               "of the ratio to the SGD step / the floor (2 passes + 1 SGD step) timed in the same rep; bookkeeping"
               " = median over reps of (step - its floor in that rep; periodic: sgd + (floor - sgd)/k), also in SGD"
               " steps; * periodic: each sample is the mean of whole periods (k = 5)")
    for wname, w in res["workloads"].items():
        info = w["info"]
        out += ["", f"== {wname}: {info['param_tensors']} tensors, {info['params']:,} parameters =="]
        rows = []
        for key, e in w["steps"].items():
            star = "*" if e["periodic"] else ""
            rows.append([key + star, f"{e['median_ms']:.2f}", f"{e['mean_ms']:.2f}", f"{e['median_x_sgd']:.3f}",
                         f"{e['mean_x_sgd']:.3f}", f"{e['x_sgd']:.3f}", f"{e['x_floor']:.3f}",
                         f"{e['bookkeeping_ms']:+.3f}", f"{e['bookkeeping_x_sgd']:+.3f}"])
        out.append(table(["step", "median ms", "mean ms", "median x SGD", "mean x SGD", "paired x SGD",
                          "paired x floor", "bookkeeping ms", "bookkeeping x SGD"], rows))
    mem = res.get("memory")
    if mem:
        out += ["", f"== peak extra memory (x parameter bytes; {mem['how']}) =="]
        rows = []
        for name in mem["ours"].keys() | mem["peers"].keys():
            o, p = mem["ours"].get(name, {}), mem["peers"].get(name, {})
            rows.append([name, _mem(o), _mem(p)])
        out.append(table(["method", "flatminima: peak (held)", "pytorch_optimizer: peak (held)"], sorted(rows)))
    out += ["", "== targets (issue #15) =="]
    for t in res["targets"]:
        v = "-" if t["value"] is None else f"{t['value']:.3f}"
        out.append(f"[{'PASS' if t['pass'] else 'MISS'}] {t['name']}: {v}  ({t['detail']})")
    return "\n".join(out)


def _mem(m: dict[str, Any]) -> str:
    if not m:
        return "-"
    if "error" in m:
        return "ERROR " + m["error"][:40]
    return f"{m['peak_extra_x_params']:.2f} ({m['held_x_params']:.2f})"


def run_peers(*, quick: bool = False, tiny: bool = False, device: str = "cpu", threads: int = 1,
              reps: int | None = None, memory: bool = True, memory_methods: list[str] | None = None,
              methods: list[str] | None = None, models: list[str] | None = None,
              progress: Callable[[str], None] | None = None, out: str | None = None) -> dict[str, Any]:
    """Run the side-by-side benchmark; returns the results (the JSON of ``--out``). Without
    pytorch_optimizer installed the peers' rows are left out and the meta says so."""
    from . import peer_memory

    progress = progress or (lambda msg: None)
    dev = torch.device(device)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    peers = have_peers()
    methods = methods or [n for n, _ in PAIRS] + list(OURS_ONLY)
    reps = reps if reps is not None else (3 if quick else 21)
    meta: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "argv": sys.argv,
                            "device": str(dev), "threads": threads, "reps": reps, "quick": quick, "tiny": tiny}
    if peers:
        from importlib.metadata import version

        meta["pytorch_optimizer"] = version("pytorch_optimizer")
    else:
        progress("pytorch_optimizer is not installed: timing flatminima alone (pip install pytorch_optimizer)")
    res: dict[str, Any] = {"meta": meta, "methods": methods, "workloads": {}}
    try:
        for wl in workloads(dev, tiny):
            if models is not None and wl.name not in models:
                continue
            res["workloads"][wl.name] = bench_workload(
                wl, methods, peers=peers, reps=reps, warmup=1 if quick else 2, sample_s=0.0 if quick else 0.06,
                sync=sync, progress=progress)
            gc.collect()
    finally:
        torch.set_num_threads(old)
    if memory:
        width = 256 if tiny else 4096
        res["memory"] = peer_memory.measure(memory_methods or [n for n, _ in PAIRS], device=device, width=width,
                                            peers=peers, threads=threads, progress=progress)
    res["targets"] = targets(res)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    return res


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, numbers not meaningful")
    p.add_argument("--tiny", action="store_true", help="tiny models (the test suite)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    p.add_argument("--out", default=None, help="also write the results as JSON")
    a = p.parse_args(argv)
    res = run_peers(quick=a.quick, tiny=a.tiny, device=a.device, threads=a.threads, reps=a.reps,
                    memory=not a.no_memory, out=a.out,
                    progress=lambda m: print(f"[peers] {m}", file=sys.stderr, flush=True))
    print(render(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
