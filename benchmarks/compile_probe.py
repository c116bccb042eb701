"""torch.compile with every flatminima method: the numbers of docs/compile.md.

    python -m benchmarks.compile_probe                      # everything (~5 min on 2 CPU cores)
    python -m benchmarks.compile_probe --parts model        # one part
    python -m benchmarks.compile_probe --methods sam esam --backends aot_eager

Parts (each prints a markdown table):

* ``model``: a ``torch.compile``d MLP trained ``--steps`` steps by every
  method, through ``step(closure)`` and through the explicit API, against
  the same run in eager mode: the largest weight difference, the number of
  graph compilations (a counting backend wrapped around the real one), the
  time of the first step (the compilation) and the median later step.
* ``base``: the base optimizer's own step compiled
  (``opt.base_optimizer.step = torch.compile(opt.base_optimizer.step)``).
* ``step``: ``torch.compile(opt.first_step / opt.second_step)``: graphs and
  graph breaks (``torch._dynamo.explain``), the break reasons, and what
  ``fullgraph=True`` stops at.
* ``setattr``: whether this torch drops attribute assignments made on an
  ``Optimizer`` inside compiled code (see docs/compile.md).

Every method runs with its default hyperparameters and the first closure form
it accepts (PyTorch's, else ESAM's per-sample losses). The timings are of a
tiny model on a CPU: they show the compilation cost and the overhead, not a
speed-up.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import statistics
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima

STEPS = 10
BATCH = 64


def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(BATCH, 32, generator=g), torch.randint(0, 10, (BATCH,), generator=g)) for _ in range(n)]


def closure_for(opt: Any, fwd: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, form: str) -> Callable:
    if form == "per_sample":

        def per_sample(indices: torch.Tensor | None = None) -> torch.Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(fwd(xb), yb, reduction="none")

        return per_sample

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(fwd(x), y)
        loss.backward()
        return loss

    return closure


def explicit_step(opt: Any, fwd: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor, form: str) -> None:
    """The explicit API as users write it (ESAM's per-sample form: clean
    pass under ``clean_pass()``, ranking forward, ``select_samples``)."""
    if form == "per_sample":
        with opt.clean_pass():
            losses = F.cross_entropy(fwd(x), y, reduction="none")
            if losses.requires_grad:
                losses.mean().backward()
        if opt.first_step(zero_grad=True):
            with torch.no_grad():
                after = F.cross_entropy(fwd(x), y, reduction="none")
            idx = opt.select_samples(losses.detach(), after)
            F.cross_entropy(fwd(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)
        return
    F.cross_entropy(fwd(x), y).backward()
    if opt.first_step(zero_grad=True):
        F.cross_entropy(fwd(x), y).backward()
    opt.second_step(zero_grad=True)


def build(method: str, base: type[torch.optim.Optimizer] = torch.optim.SGD, **base_kwargs: Any) -> tuple[nn.Module, Any]:
    model = mlp()
    kwargs = base_kwargs or {"lr": 0.05, "momentum": 0.9}
    return model, flatminima.create(method, model.parameters(), base, **kwargs)


def closure_form(method: str) -> str:
    """The closure form ``step`` takes at the method's defaults, from its
    registry record: "loss" (PyTorch's) or "per_sample" (ESAM's)."""
    return flatminima.get_method(method).closure


def train(method: str, backend: str | None, api: str, steps: int) -> dict[str, Any]:
    """``steps`` steps from fixed weights and data; the model compiled with
    ``backend`` (None: eager). Returns the weights, compilations and times."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    form = closure_form(method)
    model, opt = build(method)
    counter = CompileCounterWithBackend(backend) if backend else None
    fwd = torch.compile(model, backend=counter) if counter else model
    times = []
    for i, (x, y) in enumerate(batches(steps)):
        torch.manual_seed(i)
        start = time.perf_counter()
        if api == "closure":
            opt.step(closure_for(opt, fwd, x, y, form))
        else:
            explicit_step(opt, fwd, x, y, form)
        times.append(time.perf_counter() - start)
    return {
        "weights": [p.detach().clone() for p in model.parameters()],
        "frames": counter.frame_count if counter else 0,
        "times": times,
        "counters": dict(opt.counters),
    }


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a, b))


def part_model(methods: list[str], backends: list[str], steps: int) -> None:
    print(f"\n### Compiled model vs eager ({steps} steps, float32 MLP 32-64-64-10, batch {BATCH}, SGD momentum)\n")
    print("| method | closure form | backend | API | max abs weight diff | compilations | first step (s) | later steps compiled / eager (ms) |")
    print("|---|---|---|---|---|---|---|---|")
    for method in methods:
        form = closure_form(method)
        for api in ("closure", "explicit"):
            ref = train(method, None, api, steps)
            for backend in backends:
                if backend != "aot_eager" and api == "explicit":
                    continue  # the explicit API compiles the same graphs; keep the probe short
                got = train(method, backend, api, steps)
                assert got["counters"] == ref["counters"], (method, got["counters"], ref["counters"])
                later = statistics.median(got["times"][1:]) * 1e3
                later_eager = statistics.median(ref["times"][1:]) * 1e3
                print(
                    f"| {method} | {form} | {backend} | {api} | {max_diff(ref['weights'], got['weights']):.2g} | "
                    f"{got['frames']} | {got['times'][0]:.2f} | {later:.2f} / {later_eager:.2f} |",
                    flush=True,
                )


def part_base(methods: list[str], backends: list[str], steps: int) -> None:
    from torch._dynamo.testing import CompileCounterWithBackend

    print(f"\n### The base optimizer's step compiled, model eager ({steps} steps)\n")
    print("| method | base | backend | max abs weight diff | compilations | first step (s) |")
    print("|---|---|---|---|---|---|")
    bases = [(torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}), (torch.optim.Adam, {"lr": 1e-3})]
    for backend in backends:
        for base, kw in bases:
            for method in methods if backend == "aot_eager" else methods[:1]:
                form = closure_form(method)
                out = []
                for compiled in (False, True):
                    torch._dynamo.reset()
                    model, opt = build(method, base, **kw)
                    counter = CompileCounterWithBackend(backend)
                    if compiled:
                        opt.base_optimizer.step = torch.compile(opt.base_optimizer.step, backend=counter)
                    times = []
                    for i, (x, y) in enumerate(batches(steps)):
                        torch.manual_seed(i)
                        start = time.perf_counter()
                        opt.step(closure_for(opt, model, x, y, form))
                        times.append(time.perf_counter() - start)
                    out.append(([p.detach().clone() for p in model.parameters()], counter.frame_count, times))
                print(
                    f"| {method} | {base.__name__} | {backend} | {max_diff(out[0][0], out[1][0]):.2g} | "
                    f"{out[1][1]} | {out[1][2][0]:.2f} |",
                    flush=True,
                )


def _function_at(path: str, line: int) -> str:
    """``module.py:function`` of ``path:line`` (the enclosing ``def``)."""
    import linecache

    name = "?"
    for n in range(line, 0, -1):
        m = re.match(r"\s*def (\w+)", linecache.getline(path, n))
        if m:
            name = m.group(1)
            break
    short = path.split("site-packages/")[-1].split("src/")[-1]
    return f"{short}:{name}"


def _reason(text: str) -> str:
    """The one-line reason of a graph-break message or a dynamo exception."""
    skip = ("Graph break", "Graph Break Reason", "Encountered graph break", "Failed to handle", "Explanation",
            "Hint", "Developer debug", "For more details", "User code traceback", "Stack variable", "from user code")
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    for ln in lines:
        if "data-dependent expression" in ln:
            return "data-dependent branch on a tensor value"
        if not ln.startswith(skip) and not ln.startswith("File "):
            return ln[:80]
    return "?"


class _BreakLog(logging.Handler):
    """Collects dynamo's graph-break log (``TORCH_LOGS=graph_breaks``) as
    ``reason (module.py:function)`` per break site."""

    def __init__(self) -> None:
        super().__init__()
        self.sites: Counter[str] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        m = re.search(r"in user code at (\S+):(\d+)", msg)
        where = _function_at(m.group(1), int(m.group(2))) if m else "?"
        self.sites[f"{_reason(msg.split(chr(10), 1)[-1])} ({where})"] += 1


def _where(exc: BaseException) -> str:
    frames = [f for f in getattr(exc, "real_stack", None) or [] if "flatminima" in f.filename or "torch/optim" in f.filename]
    return _function_at(frames[-1].filename, frames[-1].lineno) if frames else "?"


def _state_after(opt: Any, which: str) -> str:
    """Whether the optimizer's step state survived a compiled phase (public API only)."""
    if which == "second_step":
        return f"step counters {opt.counters}"
    try:
        opt.second_step()
    except ValueError as e:
        return f"but the step state is lost: second_step() raises {str(e)[:45]!r}"
    return "and the step state survived"


def part_step(methods: list[str], bypass_finite_check: bool = False) -> None:
    """``bypass_finite_check``: replace flatminima's host-side finiteness
    check by ``True`` (probe only: shows what would break next)."""
    from flatminima import _tensorops

    title = " with the non-finite check bypassed (what breaks next)" if bypass_finite_check else ""
    print(f"\n### Compiling the optimizer's own step (torch._dynamo.explain){title}\n")
    print("| method | phase | graphs | graph breaks | break sites: reason (where) | fullgraph=True stops at |")
    print("|---|---|---|---|---|---|")
    torch._logging.set_logs(graph_breaks=True)
    log = logging.getLogger("torch._dynamo.symbolic_convert.__graph_breaks")
    quiet = logging.Filter()
    quiet.filter = lambda record: not record.name.endswith("__graph_breaks")  # type: ignore[method-assign]
    handlers = logging.getLogger("torch").handlers + logging.getLogger("torch._dynamo").handlers
    for h in handlers:
        h.addFilter(quiet)  # collected below, not printed
    real_check = _tensorops.is_finite
    if bypass_finite_check:
        _tensorops.is_finite = lambda value: True
    for method in methods:
        for which in ("first_step", "second_step"):
            row: list[str] = []
            for fullgraph in (False, True):
                model, opt = build(method)
                x, y = batches(1)[0]
                F.cross_entropy(model(x), y).backward()  # the explicit API: the same for every closure form
                if which == "second_step" and opt.first_step():
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                torch._dynamo.reset()
                fn = getattr(opt, which)
                if not fullgraph:
                    sites = _BreakLog()
                    log.addHandler(sites)
                    try:
                        ex = torch._dynamo.explain(fn)()
                    finally:
                        log.removeHandler(sites)
                    reasons = "; ".join(f"{k} x{n}" if n > 1 else k for k, n in sites.sites.items()) or "none"
                    row += [str(ex.graph_count), str(ex.graph_break_count), reasons]
                else:
                    try:
                        torch.compile(fn, backend="eager", fullgraph=True)()
                    except Exception as e:  # noqa: BLE001 - reported
                        row.append(f"{_reason(e)} ({_where(e)})")
                    else:
                        row.append("compiles, " + _state_after(opt, which))
                opt.cancel_step()
            print(f"| {method} | {which} | " + " | ".join(row) + " |", flush=True)
    _tensorops.is_finite = real_check
    for h in handlers:
        h.removeFilter(quiet)
    torch._logging.set_logs()


class _Probe(torch.optim.Optimizer):
    def __init__(self, params: Any) -> None:
        super().__init__(params, {})
        self.phase: str | None = None
        self.counts = {"n": 0}

    def mark(self) -> None:
        self.phase = "set"  # attribute assignment
        self.counts["n"] += 1  # dict item mutation


class _Plain:
    def __init__(self) -> None:
        self.phase: str | None = None
        self.counts = {"n": 0}

    mark = _Probe.mark


def part_setattr() -> None:
    print("\n### Attribute assignments on an Optimizer inside compiled code\n")
    for obj in (_Probe([nn.Parameter(torch.zeros(1))]), _Plain()):
        torch._dynamo.reset()
        torch.compile(obj.mark, backend="eager", fullgraph=True)()
        kind = "torch.optim.Optimizer subclass" if isinstance(obj, torch.optim.Optimizer) else "plain object"
        print(f"- {kind}: `self.phase = 'set'` -> {obj.phase!r}; `self.counts['n'] += 1` -> {obj.counts['n']}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", nargs="+", default=["model", "base", "step", "setattr"],
                    choices=["model", "base", "step", "setattr"])
    ap.add_argument("--methods", nargs="+", default=None, help="default: flatminima.list_methods()")
    ap.add_argument("--backends", nargs="+", default=["aot_eager", "inductor"])
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # dynamo's graph-break and recompile-limit warnings: counted, not printed
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)
    methods = args.methods or flatminima.list_methods()
    print(f"torch {torch.__version__}, flatminima {getattr(flatminima, '__version__', '?')}, "
          f"{os.cpu_count()} CPU(s), {args.threads} thread(s)")
    if "model" in args.parts:
        part_model(methods, args.backends, args.steps)
    if "base" in args.parts:
        part_base(methods, args.backends, args.steps)
    if "step" in args.parts:
        part_step(methods)
        part_step(methods, bypass_finite_check=True)
    if "setattr" in args.parts:
        part_setattr()
    return 0


if __name__ == "__main__":
    sys.exit(main())
