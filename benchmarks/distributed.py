"""FSDP2 against DDP on 2 processes: SAM's step time and the tensor bytes each rank holds at the step's peak.

    python -m benchmarks.distributed [--quick] [--tiny] [--out FILE]

(``make bench`` prints it with the training set-ups.) Two processes (gloo,
CPU, one thread each, file rendezvous) train copies of one MLP
(``DEPTH`` layers ``WIDTH`` x ``WIDTH``: 4.2 M parameters, 16.8 MB in fp32)
with SAM on SGD with momentum, each rank on its own batch of ``BATCH``, in
three set-ups timed round-robin in one loop:

* ``ddp/sam``: DDP, per-replica eps (the clean pass under ``no_sync``);
* ``ddp/sam-sync``: DDP with ``sync_perturbations=True``, one global eps:
  the same step as FSDP2's;
* ``fsdp2/sam``: FSDP2 (``fully_shard`` per layer and on the root).

A step ends when the slower rank ends it (the per-rep maximum of the ranks).

**Memory, counted in tensors (not the process's RSS).** At the step's peak,
after the perturbed pass's backward and before ``second_step``, a rank holds
the parameters (pointing at ``w + eps``), their gradients (``g_p``), what
the step keeps aside (``w``), and the base optimizer's state (the
momentum). Every tensor reachable from the parameters, their ``.grad`` and
the optimizer is counted once per storage, a DTensor by its local shard.
Not counted: DDP's gradient buckets (one more gradient-sized buffer, held in
C++), FSDP2's all-gathered parameters during forward and backward (one
layer at a time, freed after it), activations.
"""

from __future__ import annotations

import argparse
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
from torch import nn

from . import _env  # noqa: F401  (flatminima from src/ when not installed)
from . import timing as TM
from .report import table

WIDTH, DEPTH, BATCH = 1024, 4, 32
TINY = (32, 2, 8)
SETUPS = ("ddp/sam", "ddp/sam-sync", "fsdp2/sam")
#: what each rank holds at the step's peak, in this order
PARTS = ("params", "grads", "kept", "base_state")
STEP_PARTS = ("params", "grads", "kept")  # the parameter, gradient and eps bytes


def _mlp(width: int, depth: int) -> nn.Sequential:
    torch.manual_seed(0)  # the same weights on every rank and in every set-up
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def _setup(kind: str, width: int, depth: int) -> tuple[nn.Module, Any]:
    import flatminima

    model = _mlp(width, depth)
    if kind.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        net: nn.Module = model
        extra: dict[str, Any] = {}
    else:
        net = nn.parallel.DistributedDataParallel(model)
        extra = {"model": net, "sync_perturbations": kind.endswith("sync")}
    opt = flatminima.create("sam", net.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3, momentum=0.9, **extra)
    return net, opt


def held_bytes(model: nn.Module, opt: Any) -> dict[str, int]:
    """Bytes of the tensors a rank holds, per :data:`PARTS`, each storage counted once (the first
    part that reaches it), a DTensor by its local shard."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        local = t.to_local() if hasattr(t, "to_local") and hasattr(t, "device_mesh") else t  # type: ignore[operator]
        storage = local.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            return 0
        seen.add(storage.data_ptr())
        return int(storage.nbytes())

    def reachable(obj: Any, skip: tuple[str, ...], visited: set[int]) -> int:
        if id(obj) in visited:
            return 0
        visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            return size(obj)
        if isinstance(obj, dict):
            return sum(reachable(v, skip, visited) for k, v in obj.items() if k not in skip)
        if isinstance(obj, (list, tuple, set, frozenset)):
            return sum(reachable(v, skip, visited) for v in obj)
        if hasattr(obj, "__dict__") and not isinstance(obj, (nn.Module, type)) and not callable(obj):
            return reachable(vars(obj), skip, visited)
        return 0

    params = list(model.parameters())
    out = {"params": sum(size(p) for p in params), "grads": sum(size(p.grad) for p in params if p.grad is not None)}
    out["kept"] = reachable(vars(opt), ("base_optimizer", "param_groups", "model"), set())
    out["base_state"] = reachable(dict(opt.base_optimizer.state), (), set())
    return out


def _peak(net: nn.Module, opt: Any, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """One SAM step through the explicit API, counting what is held after the perturbed backward."""
    with opt.clean_pass():
        F.cross_entropy(net(x), y).backward()
    opt.first_step(zero_grad=True)
    F.cross_entropy(net(x), y).backward()
    held = held_bytes(net, opt)
    opt.second_step(zero_grad=True)
    return held


def run_rank(rank: int, *, tiny: bool, reps: int, warmup: int) -> dict[str, Any]:
    """What one rank measures (the process group is up): per set-up, step times and the bytes at the peak."""
    width, depth, batch = TINY if tiny else (WIDTH, DEPTH, BATCH)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own batch
    x, y = torch.randn(batch, width, generator=g), torch.randint(0, width, (batch,), generator=g)
    nets = {kind: _setup(kind, width, depth) for kind in SETUPS}
    steps: dict[str, Callable[[], Any]] = {}
    for kind, (net, opt) in nets.items():

        def closure(opt: Any = opt, net: nn.Module = net) -> torch.Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            return loss

        steps[kind] = lambda opt=opt, closure=closure: opt.step(closure)
    # inner=1 and the round-robin's seeded order: both ranks run the same steps in the same order
    seconds = TM.round_robin(steps, reps=reps, warmup=warmup, inner=1, sync=lambda: None)
    held = {kind: _peak(net, opt, x, y) for kind, (net, opt) in nets.items()}
    n_params = sum(p.numel() for p in _mlp(width, depth).parameters())
    return {"seconds": seconds, "bytes": held, "params": n_params}


def _worker(rank: int, init: str, out_dir: str, tiny: bool, reps: int, warmup: int) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=2)
    try:
        torch.save(run_rank(rank, tiny=tiny, reps=reps, warmup=warmup), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def summarize(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """The ranks' results as one: per-rep maximum step time, per-part maximum bytes over the ranks."""
    seconds = {k: [max(s) for s in zip(*(r["seconds"][k] for r in ranks))] for k in SETUPS}
    held = {k: {part: max(r["bytes"][k][part] for r in ranks) for part in PARTS} for k in SETUPS}
    step = {k: sum(held[k][p] for p in STEP_PARTS) for k in SETUPS}
    return {
        "params": ranks[0]["params"],
        "seconds": {k: TM.summarize(v) for k, v in seconds.items()},
        "bytes": held,
        "step_bytes": step,
        "fsdp2_vs_ddp": {
            "step_bytes": step["fsdp2/sam"] / step["ddp/sam-sync"],
            "all_bytes": sum(held["fsdp2/sam"].values()) / sum(held["ddp/sam-sync"].values()),
            "time": statistics.median(seconds["fsdp2/sam"]) / statistics.median(seconds["ddp/sam-sync"]),
        },
    }


def bench_distributed(*, tiny: bool = False, reps: int = 15, warmup: int = 2,
                      progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    import torch.multiprocessing as mp

    if progress:
        progress("fsdp2 vs ddp: 2 processes (gloo, 1 thread each)")
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_worker, args=(os.path.join(tmp, "init"), tmp, tiny, reps, warmup), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=True) for r in range(2)]
    width, depth, batch = TINY if tiny else (WIDTH, DEPTH, BATCH)
    res = summarize(ranks)
    res["meta"] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                   "reps": reps, "width": width, "depth": depth, "batch": batch}
    return res


def render(res: dict[str, Any]) -> str:
    meta, mb = res["meta"], 1 / 2**20
    lines = [(
        f"FSDP2 vs DDP, 2 processes (gloo, CPU, 1 thread each): SAM on SGD (momentum), MLP {meta['depth']} x "
        f"Linear({meta['width']}, {meta['width']}) = {res['params'] / 1e6:.2f} M parameters, batch {meta['batch']} "
        f"per rank; medians of {meta['reps']} round-robin reps. MiB held per rank at the step's peak (tensors):"
    )]
    rows = []
    for k in SETUPS:
        b = res["bytes"][k]
        rows.append([k, f"{res['seconds'][k]['median'] * 1e3:.1f}", *(f"{b[p] * mb:.2f}" for p in PARTS),
                     f"{res['step_bytes'][k] * mb:.2f}"])
    lines.append(table(["set-up", "step [ms]", "w + eps", "g_p", "w kept", "momentum", "w+eps, g_p, w"], rows,
                       "lrrrrrr"))
    r = res["fsdp2_vs_ddp"]
    lines.append(f"FSDP2 / DDP (sync, the same step): parameter, gradient and eps bytes x{r['step_bytes']:.3f}, "
                 f"with the momentum x{r['all_bytes']:.3f}, step time x{r['time']:.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="few repetitions (smoke run)")
    p.add_argument("--tiny", action="store_true", help="a tiny model")
    p.add_argument("--out", default=None, help="also write the results as JSON to this file")
    a = p.parse_args(argv)
    res = bench_distributed(tiny=a.tiny, reps=3 if a.quick else 15, warmup=1 if a.quick else 2,
                            progress=lambda m: print(m, file=sys.stderr, flush=True))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(res, f, indent=1, default=str)
    print(render(res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
