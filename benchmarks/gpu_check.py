"""``make gpu-check``: the CUDA checks, host synchronisations and benchmark ratios in one command.

Runs with the machine's own Python and ``PYTHONPATH=src`` (a GPU machine has
its own CUDA build of PyTorch and no package index), in at most about 4
minutes on one GPU:

1. checks, each PASS / FAIL (with the error) / SKIP (with the missing package):
   fp16 with a real ``GradScaler`` (an inf in a pass skips the step and halves
   the scale); the fast path equal to the per-tensor reference path; every
   registered method one step; FSDP2 (``fully_shard``) at world size 1 with
   nccl, equal to the unsharded step;
2. host synchronisations per ``step()`` of every method
   (``torch.cuda.set_sync_debug_mode("warn")``), with and without a GradScaler;
3. the benchmark ratios of :mod:`benchmarks.peers` on the device (floor, the
   peers where pytorch_optimizer is installed, peak memory);

and writes ``report.txt`` and ``report.json`` under ``--out``. Without a GPU
it runs its CPU fallback: the same checks on CPU (FSDP2 over gloo), host
reads instead of CUDA syncs (:mod:`benchmarks.syncs`), tiny benchmark models;
under a minute.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._env import REPO, flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima

from flatminima import _deferred

from . import syncs

SAM_LIKE = ("sam", "asam", "wsam", "gsam")  # issue #15: at most one sync per step without a GradScaler


def _mlp(device: torch.device, dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).to(device, dtype)


def _batch(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, generator=g).to(device, dtype), torch.randint(0, 4, (8,), generator=g).to(device)


def _step_fn(name: str, model: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor,
             scaler: Any = None) -> Callable[[], Any]:
    """One ``opt.step`` with the closure form of the method's registry record."""
    if flatminima.get_method(name).closure == "per_sample":
        def per_sample(indices: torch.Tensor | None = None) -> torch.Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        return lambda: opt.step(per_sample)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with torch.autocast(x.device.type, torch.float16, enabled=scaler is not None):
            loss = F.cross_entropy(model(x), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    return lambda: opt.step(closure, scaler=scaler) if scaler is not None else opt.step(closure)


def _create(name: str, net: nn.Module, **kw: Any) -> Any:
    return flatminima.create(name, net.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9, **kw)


# ---------------------------------------------------------------- checks


def check_fp16_scaler(device: torch.device) -> str:
    """SAM in fp16 autocast with a real GradScaler: finite steps change the weights; an inf in the
    perturbed pass skips the step, leaves the weights as they were and halves the scale."""
    model = _mlp(device)
    x, y = _batch(device)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    opt = _create("sam", model)
    step = _step_fn("sam", model, opt, x, y, scaler)
    for _ in range(3):
        step()
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    calls = [0]

    def inf_on_perturbed() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        with torch.autocast(device.type, torch.float16):
            loss = F.cross_entropy(model(x), y)
        if calls[0] == 2:
            loss = loss * float("inf")
        scaler.scale(loss).backward()
        return loss

    opt.step(inf_on_perturbed, scaler=scaler)
    if opt.skipped_steps != 1 or any(not torch.equal(a, b) for a, b in zip(before, model.parameters())):
        raise AssertionError(f"inf in the perturbed pass: skipped_steps {opt.skipped_steps}, weights changed")
    if scaler.get_scale() != scale / 2:
        raise AssertionError(f"scale {scaler.get_scale()} after an inf, expected {scale / 2}")
    step()
    if opt.skipped_steps != 1 or not all(torch.isfinite(p).all() for p in model.parameters()):
        raise AssertionError("a finite fp16 step after the skipped one did not go through")
    return f"4 fp16 steps and one skipped, scale {scale:g} -> {scaler.get_scale():g}"


def check_fast_path_equals_reference(device: torch.device) -> str:
    """Every method, foreach=True against foreach=False, 3 steps in float64: equal to 1e-12."""
    worst = 0.0
    for name in flatminima.list_methods():
        runs = []
        for fe in (True, False):
            model = _mlp(device, torch.float64)
            x, y = _batch(device, torch.float64)
            opt = _create(name, model, foreach=fe)
            step = _step_fn(name, model, opt, x, y)
            for _ in range(3):
                step()
            runs.append([p.detach() for p in model.parameters()])
        for a, b in zip(*runs):
            err = ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()
            worst = max(worst, err)
            if err > 1e-12:
                raise AssertionError(f"{name}: fast path differs from the reference path by {err:.2e} (relative)")
    return f"{len(flatminima.list_methods())} methods, largest relative difference {worst:.1e}"


def check_every_method_one_step(device: torch.device) -> str:
    for name in flatminima.list_methods():
        model = _mlp(device)
        x, y = _batch(device)
        before = [p.detach().clone() for p in model.parameters()]
        opt = _create(name, model)
        _step_fn(name, model, opt, x, y)()
        if opt.skipped_steps or all(torch.equal(a, b) for a, b in zip(before, model.parameters())):
            raise AssertionError(f"{name}: the step did not change the weights (skipped {opt.skipped_steps})")
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise AssertionError(f"{name}: non-finite weights after one step")
    return f"{len(flatminima.list_methods())} methods"


def check_fsdp2(device: torch.device) -> str:
    """FSDP2 at world size 1 (nccl on CUDA, gloo on CPU): 3 SAM steps equal the unsharded ones."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_available() or (backend == "nccl" and not dist.is_nccl_available()):
        raise _Skip(f"torch.distributed with {backend} is not available")
    with tempfile.TemporaryDirectory() as tmp:
        if device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # nccl binds one indexed device
            torch.cuda.set_device(device)
        dist.init_process_group(backend, init_method=f"file://{tmp}/init", rank=0, world_size=1,
                                device_id=device if device.type == "cuda" else None)
        try:
            plain = _mlp(device)
            sharded = copy.deepcopy(plain)
            fully_shard(sharded[0])
            fully_shard(sharded)
            x, y = _batch(device)
            for model in (plain, sharded):
                opt = _create("sam", model, rho=0.5)
                step = _step_fn("sam", model, opt, x, y)
                for _ in range(3):
                    step()
            full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in sharded.parameters()]
            err = max((a.detach() - b.detach()).abs().max().item() for a, b in zip(plain.parameters(), full))
        finally:
            dist.destroy_process_group()
    if err > 1e-6:
        raise AssertionError(f"FSDP2 ({backend}) differs from the unsharded step by {err:.2e}")
    return f"{backend}, world size 1, 3 steps, largest difference {err:.1e}"


def check_deferred_finite_check(device: torch.device) -> str:
    """``model=`` given, the deferral forced on and off: a BatchNorm model, 4 SAM steps equal
    to the early checked ones bit for bit, then a NaN clean pass: the step is skipped after the
    perturbed pass ran, with the weights and running statistics as the early checked run leaves them."""
    results = []
    for defer in (False, True):
        old, _deferred.FORCE = _deferred.FORCE, defer
        try:
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4)).to(device)
            x, y = _batch(device)
            opt = _create("sam", model, model=model)
            calls = [0]

            def closure(bad: bool = False) -> torch.Tensor:
                calls[0] += 1
                opt.zero_grad()
                loss = F.cross_entropy(model(x), y)
                (loss * float("nan") if bad else loss).backward()
                return loss

            for _ in range(4):
                opt.step(closure)
            calls[0] = 0
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(lambda: closure(bad=calls[0] == 0))
            results.append(([t.detach().clone() for t in model.state_dict().values()], calls[0], opt.skipped_steps))
        finally:
            _deferred.FORCE = old
    (early, early_calls, early_skips), (late, late_calls, late_skips) = results
    if (early_skips, late_skips) != (1, 1) or (early_calls, late_calls) != (1, 2):
        raise AssertionError(f"skips {early_skips}/{late_skips}, closure calls {early_calls}/{late_calls} "
                             "(expected 1/1 and 1/2)")
    if any(not torch.equal(a, b) for a, b in zip(early, late)):
        raise AssertionError("deferred and early checked runs differ (weights or running statistics)")
    return "4 steps and a NaN skip: weights and BatchNorm statistics equal to the early check's bit for bit"


class _Skip(Exception):
    pass


CHECKS: dict[str, Callable[[torch.device], str]] = {
    "fp16 with a real GradScaler": check_fp16_scaler,
    "fast path equals the reference path": check_fast_path_equals_reference,
    "every method, one step": check_every_method_one_step,
    "one synchronisation: the deferred finite check": check_deferred_finite_check,
    "FSDP2, world size 1": check_fsdp2,
}


def run_checks(device: torch.device) -> list[dict[str, str]]:
    out = []
    for label, fn in CHECKS.items():
        t0 = time.perf_counter()
        try:
            status, detail = "PASS", fn(device)
        except _Skip as e:
            status, detail = "SKIP", str(e)
        except Exception as e:  # reported, the other checks still run
            status, detail = "FAIL", f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}"
        out.append({"check": label, "status": status, "detail": detail, "seconds": f"{time.perf_counter() - t0:.1f}"})
    return out


# ---------------------------------------------------------------- synchronisations


def count_syncs(device: torch.device, calls: int = 3) -> dict[str, dict[str, Any]]:
    """Per method with ``model=`` (and SAM under a GradScaler, and without ``model=``): syncs per
    step() on CUDA, host reads on CPU, with the clean check deferred as on a device
    (``flatminima._deferred``; on the CPU it is otherwise off)."""
    counter = syncs.count_cuda_syncs if device.type == "cuda" else syncs.count_host_reads
    out: dict[str, dict[str, Any]] = {}
    old, _deferred.FORCE = _deferred.FORCE, True  # on CPU too: the reads a device would make
    try:
        _count_each(device, counter, calls, out)
    finally:
        _deferred.FORCE = old
    return out


def _count_each(device: torch.device, counter: Callable[..., Any], calls: int, out: dict[str, dict[str, Any]]) -> None:
    runs = [(n, False, True) for n in flatminima.list_methods()] + [("sam", True, True), ("sam", False, False)]
    for name, scaled, with_model in runs:
        model = _mlp(device)
        x, y = _batch(device)
        opt = _create(name, model, model=model if with_model else None)
        scaler = torch.amp.GradScaler(device.type) if scaled else None
        step = _step_fn(name, model, opt, x, y, scaler)
        for _ in range(2 * 5):  # past the first period of the periodic methods
            step()
        per_step, where = counter(step, calls)
        label = name + (" + GradScaler" if scaled else "") + ("" if with_model else " without model=")
        out[label] = {"per_step": per_step, "where": where}


# ---------------------------------------------------------------- the run


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(REPO / "bench_results" / "gpu_check"), help="folder of the report files")
    p.add_argument("--cpu", action="store_true", help="the CPU fallback even where a GPU is present")
    p.add_argument("--no-bench", action="store_true", help="checks and synchronisations only")
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not a.cpu
    device = torch.device("cuda" if cuda else "cpu")
    t0 = time.perf_counter()
    env = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu (no GPU: the CPU fallback)",
        "torch": torch.__version__, "python": sys.version.split()[0], "flatminima": getattr(flatminima, "__version__", "?"),
        "packages": {m: importlib.util.find_spec(m) is not None for m in ("pytorch_optimizer", "pytest", "numpy")},
    }
    report: dict[str, Any] = {"env": env, "checks": run_checks(device)}
    report["syncs"] = count_syncs(device)
    report["syncs_kind"] = ("CUDA synchronisations (set_sync_debug_mode('warn'))" if cuda else
                            "host reads of tensor values (a sync each on CUDA; free on CPU), the clean check "
                            "deferred as on a device")
    if not a.no_bench:
        from .peers import render, run_peers

        if not env["packages"]["pytorch_optimizer"]:
            report["bench_note"] = "SKIP peers: pytorch_optimizer is not installed (flatminima timed alone)"
        bench = run_peers(quick=not cuda, tiny=not cuda, device=str(device), threads=1 if not cuda else
                          torch.get_num_threads(), reps=11 if cuda else 1, memory=True,
                          methods=None if cuda else ["sam", "looksam"],
                          memory_methods=["sam", "looksam", "friendly_sam"] if cuda else ["sam"])
        report["bench"] = bench
        report["bench_text"] = render(bench)
    report["seconds"] = time.perf_counter() - t0
    text = render_report(report)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "report.txt").write_text(text + "\n")
    print(text + f"\n\nwritten: {out / 'report.txt'}, {out / 'report.json'}", flush=True)
    return 1 if any(c["status"] == "FAIL" for c in report["checks"]) else 0


def render_report(r: dict[str, Any]) -> str:
    env = r["env"]
    lines = [f"flatminima gpu-check: {env['device']}; torch {env['torch']}, Python {env['python']}",
             "packages: " + ", ".join(f"{k} {'yes' if v else 'MISSING'}" for k, v in env["packages"].items()), ""]
    for c in r["checks"]:
        lines.append(f"[{c['status']}] {c['check']} ({c['seconds']} s): {c['detail'].splitlines()[0]}")
    lines += ["", f"{r['syncs_kind']} per step():"]
    for name, s in r["syncs"].items():
        flag = ""
        if name in SAM_LIKE and r["env"]["device"] != "cpu (no GPU: the CPU fallback)":
            flag = "  (target <= 1)" if s["per_step"] <= 1 else "  (target <= 1: MISS)"
        where = ", ".join(f"{k} x{v}" for k, v in sorted(s["where"].items()))
        lines.append(f"  {name:24s} {s['per_step']:.1f}{flag}   {where}")
    if "bench_text" in r:
        lines += [""] + ([r["bench_note"]] if "bench_note" in r else []) + [r["bench_text"]]
    lines.append(f"\ntotal {r['seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
