"""Timing of the sharpness measures on the benchmark models.

``python -m benchmarks.sharpness [--quick] [--tiny] [--threads N] [--out FILE]``
runs this section alone; ``python -m benchmarks --sharpness`` adds it to
the full benchmark (results under ``"sharpness"`` in its JSON).

Per workload of :mod:`benchmarks.models` (the model in eval mode, its fixed
batch as the measurement set) it reports:

* ``F+B``: one forward + backward pass (``torch.autograd.grad``), the unit;
* ``HVP``: one Hessian-vector product from scratch (forward, backward with
  ``create_graph=True``, second backward), and with the graph of the
  gradient cached (``HessianOperator(cache_graph=True)``, what the measures
  use on a single batch: only the second backward);
* ``lambda_max`` (power iteration, PyHessian's method) and ``trace``
  (Hutchinson) with their defaults (``tol=1e-3``, at most 100 products; the
  trace from 10 samples on), wall time, products used and the value;
* then the comparison with PyHessian of :mod:`benchmarks.measures`
  (Lanczos, Hutch++ and the spectral density against PyHessian on the same
  model and batch; results under ``"versus_pyhessian"``).

Product timings are medians of ``reps`` round-robin samples; the two
measures are timed end to end (median of ``measure_reps`` runs; they are
deterministic, so every run does the same work).
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

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
from flatminima import sharpness as S
from flatminima.sharpness.hessian import HessianOperator
from flatminima.sharpness.objective import Objective

from . import timing as TM
from .measures import render as render_measures
from .measures import run_measures_benchmark
from .models import Workload, workloads
from .report import table


def _progress(msg: str) -> None:
    print(f"[bench sharpness] {msg}", file=sys.stderr, flush=True)


def bench_workload(
    wl: Workload, *, reps: int, measure_reps: int, max_iter: int, max_samples: int,
    sync: Callable[[], None], progress: Callable[[str], None],
) -> dict[str, Any]:
    model, batch = wl.model, [(wl.x, wl.y)]
    info = wl.summary()
    objective = Objective(model, batch, F.cross_entropy)
    params = objective.params
    v = [torch.randn_like(p) for p in params]
    out: dict[str, Any] = {"info": info}
    with objective.measuring(restore_weights=False):
        cached = HessianOperator(objective, cache_graph=True)
        fresh = HessianOperator(objective, cache_graph=False)
        cached(v)  # builds the graph outside the timed loop
        variants = {
            "fb": lambda: objective.loss_and_grad(),
            "hvp": lambda: fresh(v),
            "hvp_cached": lambda: cached(v),
        }
        progress(f"{wl.name}: {info['params'] / 1e6:.2f} M parameters; timing F+B and HVP, {reps} reps")
        samples = TM.round_robin(variants, reps=reps, warmup=1, inner=1, sync=sync)
        cached.close()
    for k, s in samples.items():
        out[k] = TM.summarize(s)
    fb = out["fb"]["median"]
    out["hvp"]["x_fb"] = out["hvp"]["median"] / fb
    out["hvp_cached"]["x_fb"] = out["hvp_cached"]["median"] / fb

    def timed(fn: Callable[[], Any]) -> tuple[list[float], Any]:
        ts, res = [], None
        for _ in range(measure_reps):
            gc.collect()
            sync()
            t0 = time.perf_counter()
            res = fn()
            sync()
            ts.append(time.perf_counter() - t0)
        return ts, res

    progress(f"{wl.name}: lambda_max (max_iter={max_iter}) x {measure_reps}")
    ts, eig = timed(lambda: S.hessian_eigenvalues(model, batch, method="power", max_iter=max_iter))
    out["lambda_max"] = {
        "value": eig.eigenvalues[0], "products": eig.iterations[0], "converged": eig.converged[0],
        "seconds": TM.summarize(ts), "x_fb": statistics.median(ts) / fb,
    }
    progress(f"{wl.name}: trace (max_samples={max_samples}) x {measure_reps}")
    ts, tr = timed(lambda: S.hessian_trace(model, batch, method="hutchinson", max_samples=max_samples,
                                           min_samples=min(10, max_samples)))
    out["trace"] = {
        "value": tr.trace, "stderr": tr.stderr, "products": tr.n_samples, "converged": tr.converged,
        "seconds": TM.summarize(ts), "x_fb": statistics.median(ts) / fb,
    }
    return out


def run_sharpness_benchmark(
    *,
    quick: bool = False,
    tiny: bool = False,
    device: str = "cpu",
    threads: int | None = None,
    reps: int | None = None,
    out: str | None = None,
    progress: Callable[[str], None] | None = _progress,
    print_report: bool = False,
) -> dict[str, Any]:
    """Time the measures on :func:`benchmarks.models.workloads`; return the results dict."""
    progress = progress or (lambda msg: None)
    dev = torch.device(device)
    old_threads = torch.get_num_threads()
    threads = threads or old_threads
    torch.set_num_threads(threads)
    reps = reps if reps is not None else (3 if quick else 10)
    measure_reps = 1 if quick else 3
    max_iter = 20 if quick else 100
    max_samples = 20 if quick else 100
    sync = (lambda: torch.cuda.synchronize(dev)) if dev.type == "cuda" else (lambda: None)
    res: dict[str, Any] = {
        "meta": {
            "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "device": str(dev), "threads": threads, "quick": quick, "tiny": tiny, "reps": reps,
            "measure_reps": measure_reps, "max_iter": max_iter, "max_samples": max_samples, "tol": 1e-3,
            "torch": torch.__version__,
        },
        "workloads": {},
    }
    try:
        for wl in workloads(dev, tiny=tiny):
            res["workloads"][wl.name] = bench_workload(
                wl, reps=reps, measure_reps=measure_reps, max_iter=max_iter, max_samples=max_samples,
                sync=sync, progress=progress,
            )
            del wl
            gc.collect()
    finally:
        torch.set_num_threads(old_threads)
    res["versus_pyhessian"] = run_measures_benchmark(quick=quick, tiny=tiny, device=device, threads=threads,
                                                     progress=progress)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=str)
        progress(f"wrote {out}")
    if print_report:
        print(render(res), flush=True)
    return res


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [
        f"Sharpness measures  {meta['date']}  device {meta['device']}, {meta['threads']} threads, torch {meta['torch']}"
        + ("  [QUICK: numbers not meaningful]" if meta["quick"] else ""),
        f"model in eval mode on its benchmark batch; lambda_max: power iteration (method='power') tol {meta['tol']:g}, "
        f"<= {meta['max_iter']} products; trace: Hutchinson (method='hutchinson') tol {meta['tol']:g}, 10..{meta['max_samples']} samples. "
        f"Medians of {meta['reps']} (products) / {meta['measure_reps']} (measures) runs.",
        "",
    ]
    rows = []
    for name, w in res["workloads"].items():
        lm, tr = w["lambda_max"], w["trace"]
        rows.append([
            name,
            f"{w['info']['params'] / 1e6:.2f} M",
            f"{w['fb']['median'] * 1e3:.1f}",
            f"{w['hvp']['median'] * 1e3:.1f} ({w['hvp']['x_fb']:.1f}x)",
            f"{w['hvp_cached']['median'] * 1e3:.1f} ({w['hvp_cached']['x_fb']:.1f}x)",
            f"{lm['seconds']['median']:.2f} ({lm['products']}{'' if lm['converged'] else '*'})",
            f"{lm['value']:.4g}",
            f"{tr['seconds']['median']:.2f} ({tr['products']}{'' if tr['converged'] else '*'})",
            f"{tr['value']:.4g} +- {tr['stderr']:.2g}",
        ])
    lines.append(table(
        ["workload", "params", "F+B [ms]", "HVP [ms] (x F+B)", "HVP cached [ms]", "lambda_max [s] (HVPs)",
         "lambda_max", "trace [s] (HVPs)", "trace"],
        rows, "lrrrrrrrr",
    ))
    lines.append("* = stopped at the product limit before meeting tol")
    if "versus_pyhessian" in res:
        lines += ["", render_measures(res["versus_pyhessian"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.sharpness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repetitions, 20-product limits (smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny models (used by the test suite)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: machine default)")
    p.add_argument("--reps", type=int, default=None, help="timed repetitions of the products (default 10; 3 with --quick)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    run_sharpness_benchmark(quick=a.quick, tiny=a.tiny, device=a.device, threads=a.threads, reps=a.reps, out=a.out,
                            print_report=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
