"""The benchmark driver: ``python -m benchmarks [--quick] [--device D] [--out FILE]``."""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from typing import Any

import torch

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima

from . import memory as M
from . import report
from . import timing as TM
from .models import Workload, build_method, workloads

LR = 1e-3  # small: hundreds of steps on shared weights must stay finite
MOMENTUM = 0.9
SAM_VS_FLOOR_TARGET = 1.03
BOOKKEEPING_SPEEDUP_TARGET = 3.0
MANY_TENSORS = 100
CHEAP_METHODS = ("looksam", "sam_every_k")  # a SAM step every k-th step (issue 4)
CHEAP_VS_SGD_TARGET = 1.3
PERIODIC_INNER = 10  # steps per timed sample for methods with a varying cost (two periods at k = 5)


class NoOpOptimizer(torch.optim.Optimizer):
    """A base optimizer whose step does nothing: times our overhead alone."""

    def __init__(self, params: Any, lr: float = LR, **kwargs: Any) -> None:
        super().__init__(params, dict(lr=lr, **kwargs))

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


class NoOpMomentumSGD(torch.optim.SGD):
    """SGD whose step does nothing and whose momentum buffers exist from the
    start: the bookkeeping of a method that reads the momentum (Momentum-SAM)."""

    def __init__(self, params: Any, lr: float = LR, **kwargs: Any) -> None:
        super().__init__(params, lr=lr, momentum=0.9)
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["momentum_buffer"] = torch.randn_like(p)

    def step(self, closure: Callable[[], Any] | None = None) -> None:  # type: ignore[override]
        return None


def _stderr_progress(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "flatminima": getattr(flatminima, "__version__", "?"),
        "platform": platform.platform(),
    }


def _load() -> dict[str, Any]:
    out: dict[str, Any] = {}
    try:
        out["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        with open("/proc/pressure/cpu") as f:
            out["cpu_pressure_some_avg10"] = float(f.readline().split()[1].split("=")[1])
    except (OSError, IndexError, ValueError):
        pass
    return out


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else math.nan


# ---------------------------------------------------------------- one workload


def _step_variants(
    wl: Workload, methods: list[str], paths: list[bool], sync: Callable[[], None]
) -> tuple[dict, dict, dict]:
    """Build the step variants; return (fns, meta, optimizers)."""
    params = wl.params
    fns: dict[str, Callable[[], Any]] = {}
    meta: dict[str, dict[str, Any]] = {}
    opts: dict[str, Any] = {}

    sgd = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    c_sgd = [0]
    clo_sgd = wl.closure_for(sgd, c_sgd)

    def sgd_step() -> None:
        clo_sgd()
        sgd.step()

    fns["sgd"] = sgd_step
    meta["sgd"] = {"label": "SGD step (1 fwd-bwd + SGD)", "method": None, "path": None, "counter": c_sgd}

    floor = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
    c_floor = [0]
    clo_floor = wl.closure_for(floor, c_floor)

    def floor_step() -> None:
        clo_floor()
        clo_floor()
        floor.step()

    fns["floor"] = floor_step
    meta["floor"] = {"label": "floor (2 fwd-bwd + SGD)", "method": None, "path": None, "counter": c_floor}

    for name in methods:
        for fe in paths:
            key = f"{name}[{'foreach' if fe else 'per-tensor'}]"
            counter = [0]
            meta[key] = {"label": name, "method": name, "path": "foreach" if fe else "per-tensor", "counter": counter}
            try:
                opt, fn, form = build_method(wl, name, torch.optim.SGD, counter, sync, lr=LR, momentum=MOMENTUM,
                                             foreach=fe)
            except Exception as e:
                meta[key]["error"] = f"{type(e).__name__}: {e}"
                continue
            meta[key]["closure_form"] = form
            if form != "loss":
                meta[key]["label"] = f"{name} ({form} closure)"
            fns[key] = fn
            opts[key] = opt
    return fns, meta, opts


def _try_once(fns: dict[str, Callable[[], Any]], meta: dict[str, dict[str, Any]], sync: Callable[[], None]) -> None:
    """Run each variant once; drop (and record) those that raise."""
    for key in list(fns):
        try:
            fns[key]()
            sync()
        except Exception as e:
            meta[key]["error"] = f"step: {type(e).__name__}: {e}"
            del fns[key]


def _bookkeeping_variants(wl: Workload, methods: list[str]) -> tuple[dict, dict, dict]:
    params = wl.params
    fns: dict[str, Callable[[], Any]] = {}
    setups: dict[str, Callable[[], None]] = {}
    meta: dict[str, dict[str, Any]] = {}
    # realistic gradients, computed once and restored (untimed) before every call: repeating
    # first_step/second_step on its own output drifts (ASAM shrinks eps by ~T_w per call,
    # into denormals, which are slow) and would not time what a training step does
    probe = torch.optim.SGD(params, lr=0.0)
    wl.closure_for(probe)()
    grads0 = [p.grad.detach().clone() for p in params]
    # the perturbed pass's gradients: the clean ones, slightly changed (the
    # values do not matter for the cost; they must be fresh tensors, as a
    # backward's are, distinct from the clean buffers the fast path re-points
    # the parameters at)
    perturbed0 = [g * 1.01 for g in grads0]
    perturbed = [g.clone() for g in perturbed0]

    def restore() -> None:
        with torch.no_grad():
            for p, g in zip(params, grads0):
                p.grad = g.clone()  # a new clean gradient, as a backward gives
            torch._foreach_copy_(perturbed, perturbed0)

    def perturbed_pass() -> None:
        for p, g in zip(params, perturbed):
            p.grad = g

    for name in methods:
        for fe in (True, False):
            key = f"{name}[{'foreach' if fe else 'per-tensor'}]"
            meta[key] = {"method": name, "path": "foreach" if fe else "per-tensor"}
            try:
                pre = flatminima.get_method(name).cls.pre_pass  # it reads the base optimizer's momentum
                opt = flatminima.create(name, params, NoOpMomentumSGD if pre else NoOpOptimizer, foreach=fe)
            except Exception as e:
                meta[key]["error"] = f"create: {type(e).__name__}: {e}"
                continue

            def fn(o: Any = opt) -> None:
                if o.first_step():
                    perturbed_pass()
                o.second_step()

            fns[key] = fn
            setups[key] = restore
            meta[key]["opt"] = opt
    restore()
    return fns, setups, meta


def bench_workload(
    wl: Workload,
    methods: list[str],
    *,
    reps: int,
    warmup: int,
    sample_s: float,
    bk_sample_s: float,
    sync: Callable[[], None],
    progress: Callable[[str], None],
) -> dict[str, Any]:
    info = wl.summary()
    progress(
        f"{wl.name}: {info['param_tensors']} parameter tensors, {info['params'] / 1e6:.2f} M parameters "
        f"({info['param_bytes'] / 2**20:.1f} MiB) - {wl.description}"
    )
    wl.model.train()

    # -- full steps
    fns, meta, opts = _step_variants(wl, methods, [True, False], sync)
    _try_once(fns, meta, sync)
    t_floor = TM.time_once(fns["floor"], sync)
    inner = TM.inner_for(t_floor, sample_s, cap=50)
    # Methods whose cost varies from step to step (a perturbed pass every k-th step, or when
    # the gradient norm says so: a fractional passes_per_step in the registry) are timed over
    # PERIODIC_INNER consecutive steps per sample, so that the median of samples is an
    # amortized cost that one slow step (a loaded machine) cannot move.
    inner_of = {
        k: max(inner, PERIODIC_INNER)
        if m.get("method") and not float(flatminima.get_method(m["method"]).passes_per_step).is_integer()
        else inner
        for k, m in meta.items()
        if k in fns
    }
    for m in meta.values():
        m["counter"][0] = 0
    calls = {k: 0 for k in fns}

    def counted(k: str, f: Callable[[], Any]) -> Callable[[], Any]:
        def g() -> Any:
            calls[k] += 1
            return f()

        return g

    progress(f"{wl.name}: timing {len(fns)} step variants, {reps} reps x {inner} step(s), {warmup} warm-up")
    samples = TM.round_robin(
        {k: counted(k, f) for k, f in fns.items()}, reps=reps, warmup=warmup, inner=inner_of, sync=sync,
        progress=progress, label=f"{wl.name} steps: ",
    )
    steps: dict[str, Any] = {}
    floor_s, sgd_s = samples["floor"], samples["sgd"]
    floor_med = TM.summarize(floor_s)["median"]
    sgd_med = TM.summarize(sgd_s)["median"]
    for key, m in meta.items():
        entry: dict[str, Any] = {k: v for k, v in m.items() if k != "counter"}
        if key in samples:
            st = TM.summarize(samples[key])
            entry.update(st)
            entry["passes_per_step"] = pps = m["counter"][0] / calls[key] if calls[key] else math.nan
            # A method whose cost varies from step to step (perturbing every k-th step): the median
            # of single steps would be the cheap step; use the mean over consecutive steps.
            entry["inner"] = inner_of[key]
            entry["amortized"] = amortized = inner_of[key] < 8 and abs(pps - round(pps)) > 0.01
            per_step = st["mean"] if amortized else st["median"]
            entry["per_step"] = per_step
            entry["x_floor"] = _ratio(per_step, floor_med)
            entry["x_sgd"] = _ratio(per_step, sgd_med)
            entry["paired_x_floor"] = TM.paired_ratio(samples[key], floor_s)
            entry["paired_x_sgd"] = TM.paired_ratio(samples[key], sgd_s)
            if amortized:  # mean of the per-rep ratios, not their median
                r = [a / b for a, b in zip(samples[key], floor_s)]
                entry["paired_x_floor"]["median"] = sum(r) / len(r)
            opt = opts.get(key)
            if opt is not None:
                entry["skipped_steps"] = getattr(opt, "skipped_steps", 0)
        steps[key] = entry
    # each method against SAM on the same kernel path (per step, as above)
    for key, entry in steps.items():
        sam = steps.get(f"sam[{entry.get('path')}]", {})
        if "per_step" in entry and "per_step" in sam:
            entry["x_sam"] = _ratio(entry["per_step"], sam["per_step"])

    # -- memory held between steps (walker), on the fast-path optimizers after their steps
    held: dict[str, Any] = {}
    gc.collect()
    for name in methods:
        opt = opts.get(f"{name}[foreach]")
        if opt is None:
            continue
        h = M.held_bytes(opt)
        h["total_x_params"] = h["total_bytes"] / info["param_bytes"]
        held[name] = h
    del fns, opts
    gc.collect()

    # -- bookkeeping alone: first_step + second_step, grads present, no-op base optimizer
    bfns, setups, bmeta = _bookkeeping_variants(wl, methods)
    _try_once(bfns, bmeta, sync)
    # yardstick: one pass of parameter-sized memory traffic (foreach copy of every parameter)
    copy_dst = [torch.empty_like(p) for p in wl.params]
    copy_src = [p.detach() for p in wl.params]
    bfns["_copy_pass"] = lambda: torch._foreach_copy_(copy_dst, copy_src)
    inner_bk = {}
    for key, f in bfns.items():
        if key in setups:
            setups[key]()
        inner_bk[key] = TM.inner_for(TM.time_once(f, sync), bk_sample_s, cap=100)
    progress(f"{wl.name}: timing bookkeeping of {len(bfns)} variants, {reps} reps")
    bsamples = TM.round_robin(
        bfns, reps=reps, warmup=warmup, inner=inner_bk, sync=sync, progress=progress,
        label=f"{wl.name} bookkeeping: ", setup=setups, setup_each_call=True,
    )
    bookkeeping: dict[str, Any] = {}
    copy_pass = TM.summarize(bsamples.pop("_copy_pass"))
    del copy_dst, copy_src
    for name in methods:
        row: dict[str, Any] = {}
        for path in ("foreach", "per-tensor"):
            key = f"{name}[{path}]"
            if "error" in bmeta[key]:
                row["error"] = bmeta[key]["error"]
            elif key in bsamples:
                row[path] = TM.summarize(bsamples[key])
                row[path]["inner"] = inner_bk[key]
                row[path]["skipped_steps"] = bmeta[key]["opt"].skipped_steps
        if "foreach" in row and "per-tensor" in row:
            row["speedup"] = _ratio(row["per-tensor"]["median"], row["foreach"]["median"])
            row["foreach_copy_passes"] = _ratio(row["foreach"]["median"], copy_pass["median"])
            row["per_tensor_copy_passes"] = _ratio(row["per-tensor"]["median"], copy_pass["median"])
        bookkeeping[name] = row
    for p in wl.params:
        p.grad = None
    return {"info": info, "inner": inner, "steps": steps, "bookkeeping": bookkeeping, "held": held,
            "copy_pass": copy_pass}


# ---------------------------------------------------------------- targets


def _targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    wls = results["workloads"]
    for wname, w in wls.items():
        sam = w["steps"].get("sam[foreach]", {})
        if "x_floor" in sam:
            pr = sam["paired_x_floor"]
            out.append({
                "name": f"SAM step <= {SAM_VS_FLOOR_TARGET:.2f} x floor ({wname}, foreach path)",
                "value": pr["median"], "threshold": SAM_VS_FLOOR_TARGET, "pass": pr["median"] <= SAM_VS_FLOOR_TARGET,
                "detail": f"paired per-rep ratio, IQR {pr['q1']:.3f}-{pr['q3']:.3f}; ratio of medians "
                          f"{sam['x_floor']:.3f}; +{(sam['median'] - w['steps']['floor']['median']) * 1e3:.2f} ms per step",
            })
    # methods that perturb every k-th step: close to an SGD step at the default k = 5
    for wname, w in wls.items():
        for name in CHEAP_METHODS:
            e = w["steps"].get(f"{name}[foreach]", {})
            if "x_sgd" in e:
                out.append({
                    "name": f"{name} (default k = 5) step <= {CHEAP_VS_SGD_TARGET:.1f} x SGD ({wname}, foreach path)",
                    "value": e["x_sgd"], "threshold": CHEAP_VS_SGD_TARGET, "pass": e["x_sgd"] <= CHEAP_VS_SGD_TARGET,
                    "detail": f"{e.get('passes_per_step', math.nan):.2f} closure calls per step; "
                              f"{e.get('x_sam', math.nan):.3f} x SAM",
                })
    many = [n for n, w in wls.items() if w["info"]["param_tensors"] >= MANY_TENSORS]
    target_wl = many[0] if many else max(wls, key=lambda n: wls[n]["info"]["param_tensors"])
    bk = wls[target_wl]["bookkeeping"].get("sam", {})
    if "speedup" in bk:
        out.append({
            "name": f"bookkeeping: foreach >= {BOOKKEEPING_SPEEDUP_TARGET:.0f}x cheaper than per-tensor "
                    f"({target_wl}, {wls[target_wl]['info']['param_tensors']} tensors)",
            "value": bk["speedup"], "threshold": BOOKKEEPING_SPEEDUP_TARGET,
            "pass": bk["speedup"] >= BOOKKEEPING_SPEEDUP_TARGET,
            "detail": f"{bk['foreach']['median'] * 1e3:.3f} ms vs {bk['per-tensor']['median'] * 1e3:.3f} ms",
        })
    walker = [w["held"]["sam"]["total_bytes"] for w in wls.values() if "sam" in w["held"]]
    mem = results.get("memory") or {}
    rss_held = (mem.get("methods", {}).get("sam") or {}).get("held_rss_x_params")
    if walker:
        ok = all(b == 0 for b in walker) and (rss_held is None or abs(rss_held) < 0.05)
        out.append({
            "name": "SAM holds no extra memory between steps",
            "value": max(walker), "threshold": 0, "pass": ok,
            "detail": f"walker: {max(walker)} bytes; RSS between steps vs SGD: "
                      + (f"{rss_held:+.3f} x params" if rss_held is not None else "not measured"),
        })
    peak = (mem.get("methods", {}).get("sam") or {}).get("peak_extra_x_params")
    if peak is not None:
        out.append({
            "name": "SAM step peak <= 1 extra copy of the parameters (DESIGN.md)",
            "value": peak, "threshold": 1.0, "pass": peak <= 1.05,
            "detail": f"{mem['mode']} method, {mem['params'] / 1e6:.1f} M-parameter MLP (tolerance 0.05)",
        })
    return out


# ---------------------------------------------------------------- entry points


def run_benchmark(
    *,
    quick: bool = False,
    tiny: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    reps: int | None = None,
    warmup: int | None = None,
    methods: list[str] | None = None,
    memory: bool = True,
    out: str | None = None,
    progress: Callable[[str], None] | None = _stderr_progress,
    print_report: bool = False,
    sharpness: bool = False,
    training: bool = False,
) -> dict[str, Any]:
    """Run the benchmark and return its results (the structure written by ``--out``).

    ``quick``: few repetitions (a smoke run; numbers are not meaningful).
    ``tiny``: tiny models and a tiny memory model (for the test suite).
    ``sharpness``: also time the sharpness measures (``results["sharpness"]``,
    see :mod:`benchmarks.sharpness`). ``training``: also AMP modes and DDP
    (``results["training"]``, see :mod:`benchmarks.training`).
    """
    progress = progress or (lambda msg: None)
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda given but CUDA is not available")
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    reps = reps if reps is not None else (3 if quick else 21)
    warmup = warmup if warmup is not None else (1 if quick else 2)
    sample_s = 0.0 if quick else 0.06
    bk_sample_s = 0.0 if quick else 0.03
    all_methods = flatminima.list_methods()
    methods = list(methods) if methods is not None else all_methods
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)

    results: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "argv": sys.argv,
            "machine": _machine(),
            "device": str(dev),
            "threads": threads,
            "quick": quick,
            "tiny": tiny,
            "reps": reps,
            "warmup": warmup,
            "lr": LR,
            "momentum": MOMENTUM,
            "load_start": _load(),
        },
        "methods": methods,
        "registered_methods": all_methods,
        "specs": {},
        "workloads": {},
    }
    for name in methods:
        spec = flatminima.get_method(name)
        results["specs"][name] = {
            "class": spec.cls.__name__,
            "preset": dict(spec.preset),
            "passes_per_step": spec.passes_per_step,
            "extra_copies": spec.extra_copies,
            "summary": spec.summary,
        }
    progress(f"{len(methods)} methods: {', '.join(methods)}; device {dev}, {threads} threads")
    try:
        for wl in workloads(dev, tiny=tiny):
            results["workloads"][wl.name] = bench_workload(
                wl, methods, reps=reps, warmup=warmup, sample_s=sample_s, bk_sample_s=bk_sample_s,
                sync=sync, progress=progress,
            )
            del wl
            gc.collect()
        if memory:
            if tiny:
                width, depth, batch, steps = 512, 2, 4, 1
            elif quick:
                width, depth, batch, steps = 2048, 2, 4, 1
            else:
                width, depth, batch, steps = 4096, 2, 4, 1
            progress(f"memory: child process, {depth} x Linear({width}, {width}), batch {batch}")
            results["memory"] = M.peak_memory(
                methods, device=str(dev), threads=threads, width=width, depth=depth, batch=batch, steps=steps,
                progress=progress,
            )
    finally:
        torch.set_num_threads(old_threads)
    if sharpness:
        from .sharpness import run_sharpness_benchmark

        results["sharpness"] = run_sharpness_benchmark(
            quick=quick, tiny=tiny, device=device, threads=threads, progress=progress
        )
    if training:
        from .training import run_training_benchmark

        results["training"] = run_training_benchmark(quick=quick, tiny=tiny, threads=threads, progress=progress)
    results["meta"]["load_end"] = _load()
    results["targets"] = _targets(results)
    if out:
        with open(out, "w") as f:
            json.dump(results, f, indent=1, default=str)
        progress(f"wrote {out}")
    if print_report:
        print(report.render(results), flush=True)
        if "sharpness" in results:
            from .sharpness import render as render_sharpness

            print("\n" + render_sharpness(results["sharpness"]), flush=True)
        if "training" in results:
            from .training import render as render_training

            print("\n" + render_training(results["training"]), flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="few repetitions: a smoke run, numbers not meaningful")
    p.add_argument("--tiny", action="store_true", help="tiny models (used by the test suite)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: machine default)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default 21; 3 with --quick)")
    p.add_argument("--methods", default=None, help="comma-separated subset of the registered methods")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory child process")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    p.add_argument("--sharpness", action="store_true",
                   help="also time the sharpness measures (lambda_max, trace); alone: python -m benchmarks.sharpness")
    p.add_argument("--training", action="store_true",
                   help="also time AMP modes and 2-process DDP; alone: python -m benchmarks.training")
    a = p.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    run_benchmark(
        quick=a.quick, tiny=a.tiny, device=a.device, threads=a.threads, reps=a.reps, methods=methods,
        memory=not a.no_memory, out=a.out, print_report=True, sharpness=a.sharpness,
        training=a.training,
    )
    return 0
