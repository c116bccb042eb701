"""Peak extra memory of a step, ours against pytorch_optimizer's, one fresh process each.

Each (library, method) runs in its own child process (nothing the previous
one allocated or cached can hide or inflate its figure). The child builds a
2 x ``Linear(width, width)`` MLP (width 4096: 33.6 M parameters, so that the
allocator's few MiB of noise stay near 0.02 x; batch 4, so activations are negligible), runs SGD steps (momentum 0.9)
and records their peak, frees that optimizer, then runs the method's steps
(at least ``2 k + 1``, so a periodic method has a perturbed step *with* the
state of the previous one) and records their peak. The same reader as
:mod:`benchmarks.memory`: ``MALLOC_MMAP_THRESHOLD_`` makes every
parameter-sized buffer its own mmap, ``/proc/self/clear_refs`` resets the
peak (``VmHWM``) before each step; on CUDA ``max_memory_allocated``.

peak extra = (the method's highest peak - SGD's highest peak) / parameter bytes:
everything the method adds to an SGD step, its state held between steps
included (which is what a user sizing a model sees); held = the method's
resident memory between steps minus SGD's, in the same unit.
"""

from __future__ import annotations

import gc
import json
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import torch

from ._env import REPO, subprocess_env
from .memory import _Meter, can_reset_peak_rss

LR, MOMENTUM = 1e-4, 0.9


def _child(cfg: dict[str, Any]) -> dict[str, Any]:
    from ._env import flatminima  # noqa: F401  (import path fallback)

    from . import peers
    from .models import Workload, build_method, mlp

    if cfg["library"] == "pytorch_optimizer":  # before the baseline: its import's own memory is not the step's
        import pytorch_optimizer  # noqa: F401
    torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    meter = _Meter(cfg["mode"], device)
    torch.manual_seed(0)
    width = cfg["width"]
    model = mlp([width] * 3).to(device)
    wl = Workload("wide_mlp", "", model, torch.randn(4, width, device=device),
                  torch.randint(0, width, (4,), device=device))
    pbytes = sum(p.numel() * p.element_size() for p in wl.params)

    def peak_of(step: Callable[[], Any], n: int) -> tuple[int, int]:
        step()  # warm-up: the base optimizer's momentum buffers
        top = 0
        for _ in range(n):
            meter.reset_peak()
            step()
            top = max(top, meter.peak())
        gc.collect()
        return top, meter.resident_anon()

    sgd = torch.optim.SGD(wl.params, lr=LR, momentum=MOMENTUM)
    clo = wl.closure_for(sgd)
    def sgd_step() -> None:
        clo()
        sgd.step()

    sgd_peak, sgd_held = peak_of(sgd_step, 2)
    sgd.state.clear()  # its momentum buffers: the method's base optimizer makes its own
    gc.collect()
    n = 2 * peers.K + 1
    if cfg["library"] == "pytorch_optimizer":
        opt, fn = peers.build_peer(wl, cfg["method"])
    else:
        opt, fn, _ = build_method(wl, cfg["method"], torch.optim.SGD, lr=LR, momentum=MOMENTUM)
    peak, held = peak_of(fn, n)
    return {"peak_extra_x_params": (peak - sgd_peak) / pbytes, "held_x_params": (held - sgd_held) / pbytes,
            "param_bytes": pbytes, "steps": n}


def measure(methods: list[str], *, device: str, width: int, peers: bool, threads: int,
            progress: Callable[[str], None]) -> dict[str, Any]:
    """``{"ours": {name: figures}, "peers": {...}, "how": ...}``, one child process per entry."""
    mode = "cuda" if device.startswith("cuda") else ("hwm" if can_reset_peak_rss() else None)
    out: dict[str, Any] = {"ours": {}, "peers": {}, "width": width}
    if mode is None:
        out["how"] = "not measured: /proc/self/clear_refs is not writable here"
        return out
    out["how"] = ("torch.cuda.max_memory_allocated" if mode == "cuda" else "VmHWM reset per step") + (
        f", 2 x Linear({width}, {width}), a fresh process per entry")
    env = subprocess_env()
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    libs = [("flatminima", "ours")] + ([("pytorch_optimizer", "peers")] if peers else [])
    for name in methods:
        for lib, key in libs:
            progress(f"memory: {lib} {name}")
            cfg = dict(device=device, threads=threads, width=width, mode=mode, library=lib, method=name)
            proc = subprocess.run([sys.executable, "-m", "benchmarks.peer_memory", json.dumps(cfg)], cwd=str(REPO),
                                  env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                out[key][name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
                continue
            out[key][name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))), flush=True)
