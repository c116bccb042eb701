"""Training set-ups: mixed-precision overhead and DDP scaling, in one run.

    python -m benchmarks.training [--threads 1] [--quick] [--tiny] [--out FILE]

**AMP.** On each benchmark workload, the step of plain SGD and of SAM in four
modes, timed round-robin in one loop: fp32; fp32 with a GradScaler (power-of-
two scale, no autocast: the optimizer's unscale and inf bookkeeping alone);
bf16 autocast; fp16 autocast with a GradScaler. Each mode's time is reported
as a ratio to the same optimizer's fp32 step, and SAM's as a ratio to SGD's
in the same mode. (On CPU, autocast often slows a step down: its casts cost
more than the lower precision saves. The ratio that is the optimizer's own
is "SAM x SGD" per mode, and the fp32+scaler row.)

**DDP.** Two processes (gloo, one thread each, file rendezvous) each train
on a batch the size of the single-process batch (weak scaling) with SGD,
SAM (per-replica eps: clean pass under ``no_sync``) and SAM with
``sync_perturbations=True``; the same optimizers in one process (one
thread) give the baseline, measured in the same run. Ratios are DDP step /
single-process step.

**FSDP2 against DDP.** SAM's step time and the tensor bytes each rank
holds at the step's peak, on 2 processes (:mod:`benchmarks.distributed`).
"""

from __future__ import annotations

import importlib.util

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import _env  # noqa: F401  (flatminima from src/ when not installed)
from . import timing as TM
from .models import Workload, workloads
from .report import table

import flatminima

LR, MOMENTUM = 0.01, 0.9
AMP_MODES = ("fp32", "fp32+scaler", "bf16", "fp16+scaler")
DDP_VARIANTS = ("sgd", "sam", "sam-sync")


def _progress(msg: str) -> None:
    print(f"[bench.training] {msg}", file=sys.stderr, flush=True)


def _optimizer(kind: str, model: torch.nn.Module, ddp: torch.nn.Module | None = None) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return flatminima.SAM(
        model.parameters(), torch.optim.SGD, rho=0.05, lr=LR, momentum=MOMENTUM,
        model=ddp, sync_perturbations=kind == "sam-sync",
    )


def _amp_step(wl: Workload, kind: str, mode: str) -> Callable[[], Any]:
    """One training step of ``kind`` (sgd | sam) in ``mode`` on a private copy of the model."""
    model = copy.deepcopy(wl.model)
    opt = _optimizer(kind, model)
    x, y = wl.x, wl.y
    dtype = {"bf16": torch.bfloat16, "fp16+scaler": torch.float16}.get(mode)
    scaler = torch.amp.GradScaler(x.device.type, init_scale=2.0**8) if mode.endswith("scaler") else None

    def closure() -> torch.Tensor:
        opt.zero_grad()
        if dtype is None:
            loss = F.cross_entropy(model(x), y)
        else:
            with torch.autocast(x.device.type, dtype=dtype):
                loss = F.cross_entropy(model(x).float(), y)
        (loss if scaler is None else scaler.scale(loss)).backward()
        return loss

    if kind == "sgd":
        if scaler is None:
            return lambda: opt.step(closure)

        def sgd_scaled() -> None:
            closure()
            scaler.step(opt)
            scaler.update()

        return sgd_scaled
    return lambda: opt.step(closure, scaler=scaler)


def bench_amp(wl: Workload, *, reps: int, warmup: int, sample_s: float, sync: Callable[[], None],
              progress: Callable[[str], None]) -> dict[str, Any]:
    variants = {f"{kind}/{mode}": _amp_step(wl, kind, mode) for kind in ("sgd", "sam") for mode in AMP_MODES}
    inner = {n: TM.inner_for(TM.time_once(fn, sync), sample_s) for n, fn in variants.items()}
    samples = TM.round_robin(variants, reps=reps, warmup=warmup, inner=inner, sync=sync, progress=progress,
                             label=f"{wl.name} amp: ")
    out: dict[str, Any] = {"seconds": {n: TM.summarize(s) for n, s in samples.items()}, "vs_fp32": {}, "sam_vs_sgd": {}}
    for kind in ("sgd", "sam"):
        for mode in AMP_MODES:
            out["vs_fp32"][f"{kind}/{mode}"] = TM.paired_ratio(samples[f"{kind}/{mode}"], samples[f"{kind}/fp32"])
    for mode in AMP_MODES:
        out["sam_vs_sgd"][mode] = TM.paired_ratio(samples[f"sam/{mode}"], samples[f"sgd/{mode}"])
    return out


def _ddp_steps(wl: Workload, distributed: bool) -> dict[str, Callable[[], Any]]:
    """SGD / SAM / SAM-sync steps, each over its own copy of the model (DDP-wrapped or not)."""
    steps = {}
    for kind in DDP_VARIANTS:
        if not distributed and kind == "sam-sync":
            continue  # one process: the same step as "sam"
        model = copy.deepcopy(wl.model)
        net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
        opt = _optimizer(kind, model, net if distributed else None)

        def closure(opt: torch.optim.Optimizer = opt, net: torch.nn.Module = net) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(net(wl.x), wl.y)
            loss.backward()
            return loss

        steps[kind] = lambda opt=opt, closure=closure: opt.step(closure)
    return steps


def _ddp_worker(rank: int, init: str, out_dir: str, tiny: bool, reps: int, warmup: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        res = {}
        for wl in workloads(torch.device("cpu"), tiny=tiny):
            # inner=1 and the round-robin's seeded order: both ranks run the
            # same steps in the same order (their collectives must match).
            samples = TM.round_robin(_ddp_steps(wl, True), reps=reps, warmup=warmup, inner=1,
                                     sync=lambda: None)
            res[wl.name] = samples
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def bench_ddp(*, tiny: bool, reps: int, warmup: int, progress: Callable[[str], None]) -> dict[str, Any]:
    import torch.multiprocessing as mp

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        single = {}
        for wl in workloads(torch.device("cpu"), tiny=tiny):
            progress(f"{wl.name} ddp: single process, 1 thread")
            single[wl.name] = TM.round_robin(_ddp_steps(wl, False), reps=reps, warmup=warmup, inner=1, sync=lambda: None)
        progress("ddp: 2 processes (gloo, 1 thread each)")
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_ddp_worker, args=(os.path.join(tmp, "init"), tmp, tiny, reps, warmup), nprocs=2, join=True)
            ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    finally:
        torch.set_num_threads(old)
    out: dict[str, Any] = {}
    for name, one in single.items():
        # a step ends when the slower rank ends it: take the per-rep maximum
        both = {k: [max(a, b) for a, b in zip(ranks[0][name][k], ranks[1][name][k])] for k in DDP_VARIANTS}
        out[name] = {
            "single": {k: TM.summarize(v) for k, v in one.items()},
            "ddp": {k: TM.summarize(v) for k, v in both.items()},
            "ddp_vs_single": {
                k: statistics.median(both[k]) / statistics.median(one["sam" if k == "sam-sync" else k])
                for k in DDP_VARIANTS
            },
            "sam_vs_sgd_ddp": statistics.median(both["sam"]) / statistics.median(both["sgd"]),
            "sam_vs_sgd_single": statistics.median(one["sam"]) / statistics.median(one["sgd"]),
        }
    return out


def run_training_benchmark(*, quick: bool = False, tiny: bool = False, threads: int | None = None,
                           out: str | None = None, progress: Callable[[str], None] | None = _progress,
                           print_report: bool = False, ddp: bool = True) -> dict[str, Any]:
    progress = progress or (lambda msg: None)
    old = torch.get_num_threads()
    threads = threads or old
    torch.set_num_threads(threads)
    reps = 3 if quick else 15
    warmup = 1 if quick else 2
    res: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": threads,
                 "quick": quick, "tiny": tiny, "reps": reps, "torch": torch.__version__},
        "amp": {},
    }
    try:
        for wl in workloads(torch.device("cpu"), tiny=tiny):
            res["amp"][wl.name] = bench_amp(wl, reps=reps, warmup=warmup, sample_s=0.0 if quick else 0.06,
                                            sync=lambda: None, progress=progress)
    finally:
        torch.set_num_threads(old)
    if ddp:
        from .distributed import bench_distributed

        res["ddp"] = bench_ddp(tiny=tiny, reps=reps, warmup=warmup, progress=progress)
        res["distributed"] = bench_distributed(tiny=tiny, reps=reps, warmup=warmup, progress=progress)
    if importlib.util.find_spec("transformers") is not None:  # the dev extra has it
        from .hf import bench_hf

        torch.set_num_threads(1)
        try:
            res["hf"] = bench_hf(quick=quick, tiny=tiny, progress=progress)
        finally:
            torch.set_num_threads(old)
    if out:
        with open(out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    if print_report:
        print(render(res), flush=True)
    return res


def render(res: dict[str, Any]) -> str:
    meta = res["meta"]
    lines = [f"Training set-ups  {meta['date']}  torch {meta['torch']}, {meta['threads']} threads (AMP), "
             f"medians of {meta['reps']} round-robin reps" + ("  [QUICK: numbers not meaningful]" if meta["quick"] else ""),
             "", "AMP: step time per mode; x fp32 = same optimizer's fp32 step (paired), SAM x SGD = same mode"]
    rows = []
    for name, w in res["amp"].items():
        for mode in AMP_MODES:
            sgd, sam = w["seconds"][f"sgd/{mode}"], w["seconds"][f"sam/{mode}"]
            rows.append([name, mode, f"{sgd['median'] * 1e3:.2f}", f"{w['vs_fp32'][f'sgd/{mode}']['median']:.3f}",
                         f"{sam['median'] * 1e3:.2f}", f"{w['vs_fp32'][f'sam/{mode}']['median']:.3f}",
                         f"{w['sam_vs_sgd'][mode]['median']:.3f}"])
    lines.append(table(["workload", "mode", "SGD [ms]", "SGD x fp32", "SAM [ms]", "SAM x fp32", "SAM x SGD"], rows,
                       "llrrrrr"))
    if "ddp" in res:
        lines += ["", "DDP, 2 processes (gloo, CPU, 1 thread each, per-rank batch = single-process batch): "
                  "x single = DDP step / one-process step"]
        rows = []
        for name, w in res["ddp"].items():
            for k in DDP_VARIANTS:
                base = "sam" if k == "sam-sync" else k
                rows.append([name, k, f"{w['single'][base]['median'] * 1e3:.2f}", f"{w['ddp'][k]['median'] * 1e3:.2f}",
                             f"{w['ddp_vs_single'][k]:.3f}"])
            rows.append([name, "SAM x SGD", f"{w['sam_vs_sgd_single']:.3f}", f"{w['sam_vs_sgd_ddp']:.3f}", ""])
        lines.append(table(["workload", "optimizer", "1 process [ms]", "DDP [ms]", "x single"], rows, "llrrr"))
    if "distributed" in res:
        from .distributed import render as render_distributed

        lines += ["", render_distributed(res["distributed"])]
    if "hf" in res:
        from .hf import render as render_hf

        lines += ["", render_hf(res["hf"])]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    p.add_argument("--tiny", action="store_true", help="tiny models (used by the test suite)")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the AMP part (DDP: 1 per process)")
    p.add_argument("--no-ddp", action="store_true", help="skip the two-process parts (DDP, FSDP2 vs DDP)")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    run_training_benchmark(quick=a.quick, tiny=a.tiny, threads=a.threads, out=a.out, print_report=True,
                           ddp=not a.no_ddp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
