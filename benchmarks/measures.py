"""flatminima's Hessian measures against PyHessian 0.1, same model, same batch, same run.

``python -m benchmarks.measures [--quick] [--tiny] [--threads N] [--models mlp,transformer] [--out FILE]``
runs this section alone; ``python -m benchmarks.sharpness`` and
``python -m benchmarks --sharpness`` include it (results under
``"versus_pyhessian"``). Needs ``pyhessian`` (the dev extra); without it the
section says so and is skipped.

Per workload of :mod:`benchmarks.models` (the model in eval mode, its fixed
batch; both libraries keep the gradient's graph between products, as
PyHessian does for one batch):

* ``lambda_max``: the reference is flatminima's Lanczos at ``tol=1e-10``.
  PyHessian's power iteration (``eigenvalues(maxIter=100, tol=1e-3)``)
  against flatminima's default Lanczos (``tol=1e-3``: each Ritz value's
  residual at most 1e-3 of it, a bound on its relative error): relative
  error, products, wall time, and the ratios PyHessian / flatminima.
* ``trace``: PyHessian's Hutchinson with its full ``maxIter=100`` samples
  (``tol=-inf``: its rule divides by the signed running mean, so with its
  default ``tol=1e-3`` it stops after two samples whenever the mean is
  negative, as on both models at initialisation) gives an estimate and its
  standard error ``std / sqrt(K)``; flatminima's Hutch++
  (and, for reference, its Hutchinson) then samples until its own standard
  error is at most that one (``tol=0, target_stderr=...``, at least 10
  samples so that the standard error itself is worth reading): products and
  wall time for the same standard error.
* ``density``: PyHessian's ``density(iter, n_v=1)`` and flatminima's
  ``hessian_density`` with the same seed (so the same Rademacher probe, see
  :mod:`benchmarks.pyhessian_ref`), both broadened by PyHessian's
  ``density_generate`` rule: the L1 distance of the two densities (each
  integrates to 1, so 0 is equal and 2 is disjoint), the first two moments,
  products and wall time.

Every measure is timed end to end (median of ``reps`` runs; each is
deterministic for its seed, so every run does the same work). PyHessian's
products on the transformer go through the math attention kernel, as
flatminima's do (:func:`flatminima.sharpness.objective.twice_differentiable`):
the fused kernels have no double backward.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from flatminima import sharpness as S
from flatminima.sharpness.objective import twice_differentiable

from . import pyhessian_ref as ref
from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
from .models import Workload, workloads
from .report import table


def _progress(msg: str) -> None:
    print(f"[bench measures] {msg}", file=sys.stderr, flush=True)


def _timed(fn: Callable[[], Any], reps: int, sync: Callable[[], None]) -> tuple[float, Any]:
    ts, res = [], None
    for _ in range(reps):
        gc.collect()
        sync()
        t0 = time.perf_counter()
        res = fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), res


def bench_workload(wl: Workload, *, reps: int, density_iter: int, seed: int, sync: Callable[[], None],
                   progress: Callable[[str], None]) -> dict[str, Any]:
    model, batch = wl.model.eval(), (wl.x, wl.y)
    data = [batch]
    crit = F.cross_entropy
    out: dict[str, Any] = {"info": wl.summary()}

    progress(f"{wl.name}: lambda_max reference (Lanczos, tol 1e-10)")
    exact = S.hessian_eigenvalues(model, data, tol=1e-10, max_iter=300, seed=seed + 1)
    lam = exact.eigenvalues[0]
    progress(f"{wl.name}: lambda_max, PyHessian power iteration vs Lanczos, {reps} reps")
    with twice_differentiable():
        t_ph, (ph_values, ph_n) = _timed(lambda: ref.eigenvalues(model, crit, batch, seed=seed), reps, sync)
    t_fm, fm = _timed(lambda: S.hessian_eigenvalues(model, data, seed=seed), reps, sync)
    out["lambda_max"] = {
        "reference": lam, "reference_converged": exact.converged[0], "reference_products": exact.n_products,
        "pyhessian": {"value": ph_values[0], "rel_error": abs(ph_values[0] - lam) / abs(lam), "products": ph_n,
                      "seconds": t_ph},
        "flatminima": {"value": fm.eigenvalues[0], "rel_error": abs(fm.eigenvalues[0] - lam) / abs(lam),
                       "products": fm.n_products, "seconds": t_fm, "converged": fm.converged[0]},
    }

    progress(f"{wl.name}: trace, PyHessian Hutchinson, then flatminima to the same standard error")
    with twice_differentiable():
        t_ph, (samples, ph_n) = _timed(lambda: ref.trace(model, crit, batch, seed=seed, tol=float("-inf")), reps, sync)
    ph_trace = statistics.fmean(samples)
    ph_se = statistics.stdev(samples) / len(samples) ** 0.5 if len(samples) > 1 else float("nan")
    trace: dict[str, Any] = {"pyhessian": {"value": ph_trace, "stderr": ph_se, "products": ph_n, "seconds": t_ph}}
    for method in ("hutch++", "hutchinson"):
        t, r = _timed(lambda method=method: S.hessian_trace(model, data, method=method, tol=0.0, min_samples=10, max_samples=1000,
                                              target_stderr=ph_se, seed=seed), reps, sync)
        trace[method] = {"value": r.trace, "stderr": r.stderr, "products": r.n_products, "seconds": t,
                         "met": r.converged}
    out["trace"] = trace

    progress(f"{wl.name}: density, {density_iter} Lanczos steps, PyHessian vs flatminima (same probe)")
    with twice_differentiable():
        t_ph, (nodes, weights, ph_n) = _timed(
            lambda: ref.density(model, crit, batch, seed=seed, iterations=density_iter), reps, sync)
    t_fm, sd = _timed(lambda: S.hessian_density(model, data, iterations=density_iter, seed=seed), reps, sync)
    grid, ours = sd.density()
    theirs, _ = ref.density_generate(nodes, weights)
    dx = grid[1] - grid[0]
    theirs_sd = S.SpectralDensity(nodes, weights, ph_n, sd.dimension, "rademacher")
    out["density"] = {
        "iterations": density_iter,
        "l1": float(sum(abs(a - b) for a, b in zip(ours, theirs.tolist())) * dx),
        "pyhessian": {"products": ph_n, "seconds": t_ph, "moments": [theirs_sd.moment(1), theirs_sd.moment(2)],
                      "range": [min(nodes[0]), max(nodes[0])]},
        "flatminima": {"products": sd.n_products, "seconds": t_fm, "moments": [sd.moment(1), sd.moment(2)],
                       "range": [min(sd.nodes[0]), max(sd.nodes[0])]},
    }
    return out


def run_measures_benchmark(
    *,
    quick: bool = False,
    tiny: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    reps: int | None = None,
    models: list[str] | None = None,
    seed: int = 0,
    out: str | None = None,
    progress: Callable[[str], None] | None = _progress,
    print_report: bool = False,
) -> dict[str, Any]:
    """Run the comparison on :func:`benchmarks.models.workloads`; return the results dict
    (``{"skipped": reason}`` when PyHessian is not installed)."""
    progress = progress or (lambda msg: None)
    reason = ref.missing()
    if reason is not None:
        progress(f"skipped: {reason}")
        res: dict[str, Any] = {"skipped": reason}
        if print_report:
            print(render(res), flush=True)
        return res
    from importlib.metadata import version

    import pyhessian  # noqa: F401  (version below)

    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    reps = reps if reps is not None else (1 if quick else 3)
    density_iter = 20 if quick or tiny else 100
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    res = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "device": str(dev),
                 "threads": threads, "quick": quick, "tiny": tiny, "reps": reps, "seed": seed,
                 "density_iter": density_iter, "torch": torch.__version__, "pyhessian": version("pyhessian")},
        "workloads": {},
    }
    try:
        for wl in workloads(dev, tiny=tiny):
            if models is not None and wl.name not in models:
                continue
            res["workloads"][wl.name] = bench_workload(wl, reps=reps, density_iter=density_iter, seed=seed,
                                                       sync=sync, progress=progress)
            del wl
            gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        progress(f"wrote {out}")
    if print_report:
        print(render(res), flush=True)
    return res


def render(res: dict[str, Any]) -> str:
    if "skipped" in res:
        return f"Hessian measures vs PyHessian: skipped ({res['skipped']})"
    meta = res["meta"]
    lines = [
        f"Hessian measures vs PyHessian {meta['pyhessian']}  {meta['date']}  device {meta['device']}, "
        f"{meta['threads']} threads, torch {meta['torch']}" + ("  [QUICK: numbers not meaningful]" if meta["quick"] else ""),
        f"same model (eval mode) and batch; wall time: median of {meta['reps']} runs; ratio = PyHessian / flatminima.",
        "",
    ]
    rows = []
    for name, w in res["workloads"].items():
        lm, tr, de = w["lambda_max"], w["trace"], w["density"]
        ph, fm = lm["pyhessian"], lm["flatminima"]
        rows.append([name, "lambda_max", f"{lm['reference']:.6g}",
                     f"{ph['value']:.6g} (err {ph['rel_error']:.1e})", f"{fm['value']:.6g} (err {fm['rel_error']:.1e})",
                     f"{ph['products']} / {fm['products']} = {ph['products'] / fm['products']:.1f}x",
                     f"{ph['seconds']:.2f} / {fm['seconds']:.2f} = {ph['seconds'] / fm['seconds']:.1f}x"])
        ph, pp = tr["pyhessian"], tr["hutch++"]
        hu = tr["hutchinson"]
        rows.append([name, "trace", "",
                     f"{ph['value']:.5g} +- {ph['stderr']:.2g}",
                     f"{pp['value']:.5g} +- {pp['stderr']:.2g} (Hutchinson: {hu['products']} HVPs)",
                     f"{ph['products']} / {pp['products']} = {ph['products'] / pp['products']:.1f}x",
                     f"{ph['seconds']:.2f} / {pp['seconds']:.2f} = {ph['seconds'] / pp['seconds']:.1f}x"])
        ph, fm = de["pyhessian"], de["flatminima"]
        rows.append([name, f"density ({de['iterations']} steps)", f"L1 {de['l1']:.1e}",
                     f"m1 {ph['moments'][0]:.4g}, m2 {ph['moments'][1]:.4g}",
                     f"m1 {fm['moments'][0]:.4g}, m2 {fm['moments'][1]:.4g}",
                     f"{ph['products']} / {fm['products']} = {ph['products'] / fm['products']:.1f}x",
                     f"{ph['seconds']:.2f} / {fm['seconds']:.2f} = {ph['seconds'] / fm['seconds']:.1f}x"])
    lines.append(table(["workload", "measure", "reference", "PyHessian", "flatminima", "HVPs (ratio)", "seconds (ratio)"],
                       rows, "llrrrrr"))
    lines.append("lambda_max: PyHessian power iteration tol 1e-3 vs Lanczos tol 1e-3; err = relative error against "
                 "Lanczos at tol 1e-10.")
    lines.append("trace: PyHessian's Hutchinson with 100 samples; flatminima's Hutch++ (and Hutchinson) sampled until "
                 "its standard error is at most PyHessian's.")
    lines.append("density: same Rademacher probe; L1 = integral |ours - PyHessian's| (0 equal, 2 disjoint); "
                 "m1, m2 = first two moments of the quadrature (tr(H)/n, tr(H^2)/n).")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.measures", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="one repetition, 20 density steps (smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny models (used by the test suite)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: machine default)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of each measure (default 3; 1 with --quick)")
    p.add_argument("--models", default=None, help="comma-separated subset of: transformer, mlp")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (default 0)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    models = [m.strip() for m in a.models.split(",")] if a.models else None
    run_measures_benchmark(quick=a.quick, tiny=a.tiny, device=a.device, threads=a.threads, reps=a.reps,
                           models=models, seed=a.seed, out=a.out, print_report=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
