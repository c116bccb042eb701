"""FSDP2 (``fully_shard``, DTensor parameters) and FSDP1 (``FullyShardedDataParallel``,
``use_orig_params`` False and True) on two gloo processes on CPU.

Under FSDP the step is one global eps from the averaged clean gradient, each
method's full-batch step (docs/distributed.md). For every method, on one
spawn of two ranks that runs every scenario:

* the method's invariant over the whole model at the first step, measured
  by the test from the ranks' shards with its own all-reduce (||eps|| = rho,
  ||T^-1 eps|| = rho for ASAM, sqrt(eps^T F eps) = rho for Fisher SAM);
* after 5 steps the gathered weights equal the same method's single-process
  full-batch run to 1e-6 (float32), and the counters (perturbed, skipped
  steps: the skip decisions) equal that run's on both ranks;
* under FSDP1 a method that needs whole tensors is refused with its reason
  and the alternative (FSDP2), and so is a per-shard model= mistake;
* distributed checkpoints (flatminima.distributed with torch.distributed.checkpoint):
  an FSDP2 (and DDP) run saved after 2 steps and loaded into a fresh model and
  optimizer continues bit for bit like the uninterrupted run, saving changes
  nothing, the checkpoint loads in one process, and what cannot be saved is refused.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flatminima
import helpers

WORLD, STEPS, BATCH = 2, 5, 8
pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

#: name -> (method, options); every method, and the options whose formulas take a global quantity
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "sam": ("sam", {"rho": 0.5}),
    "sam-clip": ("sam", {"rho": 0.5, "max_grad_norm": 0.05}),
    "asam": ("asam", {"rho": 0.5, "eta": 0.01}),
    "gcsam": ("gcsam", {"rho": 0.5}),
    "wsam": ("wsam", {"rho": 0.5}),
    "gsam": ("gsam", {"rho": 0.5, "alpha": 0.4}),
    "fisher_sam": ("fisher_sam", {"rho": 0.5, "eta": 1.0}),
    "friendly_sam": ("friendly_sam", {"rho": 0.5}),
    "vasso": ("vasso", {"rho": 0.5}),
    "looksam": ("looksam", {"rho": 0.5, "k": 2}),
    "looksam-layerwise": ("looksam", {"rho": 0.5, "k": 2, "layerwise": True}),
    "esam": ("esam", {"rho": 0.5, "beta": 0.5, "gamma": 1.0, "seed": 3}),
    "sam_every_k": ("sam_every_k", {"rho": 0.5, "k": 2}),
    "ae_sam": ("ae_sam", {"rho": 0.5}),
    "momentum_sam": ("momentum_sam", {"rho": 0.5}),
}
#: what FSDP1's flattened shards cannot serve: refused with this reason
WHOLE_TENSORS = {"gcsam": "mean per output channel", "esam": "one coin per parameter tensor",
                 "looksam-layerwise": "per parameter tensor"}
INVARIANT = {"sam": "l2", "gcsam": "l2", "asam": "asam", "fisher_sam": "fisher"}
SHARDINGS = ("fsdp2", "fsdp1-flat", "fsdp1-orig")


def _model() -> nn.Module:
    torch.manual_seed(0)  # dims that shard unevenly: a (3,) bias is 2 + 1 rows, FSDP1 splits a weight
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _data(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g)


def _opt(name: str, params: Any, **extra: Any) -> flatminima.SharpnessAware:
    method, kwargs = METHODS[name]
    return flatminima.create(method, params, torch.optim.SGD, lr=0.2, momentum=0.9, **kwargs, **extra)


def _closure(name: str, opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[..., Any]:
    # ESAM takes per-sample losses: it selects and runs the backward itself
    return helpers.make_closure(opt, model, x, y, "per_sample" if METHODS[name][0] == "esam" else "loss")


def full_batch(name: str) -> dict[str, Any]:
    """The method's single-process full-batch run (the semantics under FSDP)."""
    model = _model()
    opt = _opt(name, model.parameters())
    for i in range(STEPS):
        x, y = _data(i)
        opt.step(_closure(name, opt, model, x, y))
    return {"params": [p.detach().clone() for p in model.parameters()], "counters": dict(opt.counters)}


# ---------------------------------------------------------------------- the ranks
def _wrap(kind: str) -> tuple[nn.Module, nn.Module]:
    """(the module to run, the module whose parameters are the model's)."""
    model = _model()
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        fully_shard(model)
        return model, model
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    return FSDP(model, use_orig_params=kind == "fsdp1-orig", device_id=torch.device("cpu")), model


def _local(t: torch.Tensor) -> torch.Tensor:
    return (t.to_local() if hasattr(t, "to_local") else t).detach().clone()


def _global_sum(values: list[torch.Tensor]) -> float:
    """The test's own reduction of the ranks' local shards."""
    s = torch.stack([v.double().sum() for v in values]).sum() if values else torch.zeros((), dtype=torch.float64)
    dist.all_reduce(s)
    return float(s)


def _full_params(kind: str, run: nn.Module, inner: nn.Module) -> list[torch.Tensor]:
    if kind == "fsdp2":
        return [p.full_tensor().detach().clone() for p in inner.parameters()]
    return [t.detach().clone() for t in run.state_dict().values()]  # FSDP1's default: the full state dict


def _invariant(name: str, opt: Any, run: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Step 1 through the explicit API: the invariant's value measured between the two passes."""
    params = [p for g in opt.param_groups for p in g["params"]]
    with opt.clean_pass():
        nn.functional.cross_entropy(run(x), y).backward()
    w = [_local(p) for p in params]
    g = [_local(p.grad) if p.grad is not None else torch.zeros_like(wi) for p, wi in zip(params, w)]
    assert opt.first_step(zero_grad=True)
    eps = [_local(p) - wi for p, wi in zip(params, w)]
    kind, eta = INVARIANT[name], METHODS[name][1].get("eta")
    if kind == "asam":
        value = _global_sum([(e / (wi.abs() + eta)) ** 2 for e, wi in zip(eps, w)])
    elif kind == "fisher":
        value = _global_sum([e**2 * (1 + eta * gi**2) for e, gi in zip(eps, g)])
    else:
        value = _global_sum([e**2 for e in eps])
    nn.functional.cross_entropy(run(x), y).backward()
    opt.second_step(zero_grad=True)
    return value**0.5


def _run(kind: str, name: str, rank: int) -> dict[str, Any]:
    run, inner = _wrap(kind)
    opt = _opt(name, run.parameters(), model=None if kind == "fsdp2" else run)
    out: dict[str, Any] = {}
    for i in range(STEPS):
        x, y = (t.chunk(WORLD)[rank] for t in _data(i))
        if i == 0 and name in INVARIANT:
            out["invariant"] = _invariant(name, opt, run, x, y)
        else:
            opt.step(_closure(name, opt, run, x, y))
    out["params"], out["counters"] = _full_params(kind, run, inner), dict(opt.counters)
    return out


def _refusals(rank: int) -> dict[str, str]:
    """Errors expected under FSDP1, and a per-replica request under FSDP2."""
    out = {}
    for name in WHOLE_TENSORS:
        run, _ = _wrap("fsdp1-orig")
        try:
            _opt(name, run.parameters(), model=run)
            out[name] = "no error"
        except ValueError as e:
            out[name] = str(e)
    run, _ = _wrap("fsdp1-flat")
    try:
        _opt("sam", run.parameters())  # model= forgotten: a per-shard norm would be taken
        out["no-model"] = "no error"
    except ValueError as e:
        out["no-model"] = str(e)
    run, _ = _wrap("fsdp2")
    opt = _opt("sam", run.parameters())
    x, y = (t.chunk(WORLD)[rank] for t in _data(0))
    try:
        opt.step(lambda i: nn.functional.cross_entropy(run(x), y), chunks=2)
        out["chunks"] = "no error"
    except ValueError as e:
        out["chunks"] = str(e)
    before = [p.detach().clone() for p in run.parameters()]
    try:
        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            return loss

        opt.step(closure, scaler=torch.amp.GradScaler("cpu"))
        out["scaler"] = "no error"
    except ValueError as e:
        out["scaler"] = str(e)
    out["scaler_moved"] = str(any(not torch.equal(a, b) for a, b in zip(before, run.parameters())))
    return out


def _guarded(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or its traceback: the parent reports it against the case (the other cases
    still run; a collective that one rank skipped would hang, which the spawn's join shows)."""
    try:
        return fn(*args)
    except Exception:
        return traceback.format_exc()


def _zero(rank: int) -> dict[str, Any]:
    """ZeroRedundancyOptimizer as the base (each rank steps its share of the parameters and
    broadcasts them) against plain SGD, both under DDP with per-replica eps and with one global eps."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    out = {}
    for sync in (False, True):
        runs = []
        for zero in (True, False):
            model = _model()
            ddp = nn.parallel.DistributedDataParallel(model)
            base: Any = ZeroRedundancyOptimizer if zero else torch.optim.SGD
            extra = {"optimizer_class": torch.optim.SGD} if zero else {}
            opt = flatminima.create("sam", model.parameters(), base, rho=0.5, lr=0.2, momentum=0.9, model=ddp,
                                    sync_perturbations=sync, **extra)
            for i in range(STEPS):
                x, y = (t.chunk(WORLD)[rank] for t in _data(i))
                opt.step(_closure("sam", opt, ddp, x, y))
            runs.append([p.detach().clone() for p in model.parameters()])
        out[f"sync={sync}"] = max(float((a - b).abs().max()) for a, b in zip(*runs))
    return out


#: (method, base optimizer, options) saved and resumed under FSDP2: momentum, Adam's step counts, method state
DCP_CONFIGS: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "sam": ("sam", torch.optim.SGD, {"rho": 0.5, "momentum": 0.9}),
    "sam-adam": ("sam", torch.optim.Adam, {"rho": 0.5}),
    "looksam": ("looksam", torch.optim.SGD, {"rho": 0.5, "k": 2, "momentum": 0.9}),
    "friendly_sam": ("friendly_sam", torch.optim.SGD, {"rho": 0.5, "momentum": 0.9}),
    "ae_sam": ("ae_sam", torch.optim.SGD, {"rho": 0.5, "momentum": 0.9}),
}
DCP_SAVE_AT = 2


def _dcp_run(kind: str, config: tuple[str, Any, dict[str, Any]], rank: int, save: str | None = None,
             load: str | None = None, **more: Any) -> dict[str, Any]:
    """5 steps under ``kind`` ("fsdp2" or "ddp"); with ``save``, a checkpoint after DCP_SAVE_AT steps;
    with ``load``, a fresh model (other weights) and optimizer resumed from it for the remaining steps."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from flatminima.distributed import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    torch.manual_seed(1 if load else 0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    if kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        fully_shard(model[0])
        run = fully_shard(model)
        extra: dict[str, Any] = {}
    else:
        run = nn.parallel.DistributedDataParallel(model)
        extra = {"model": run}
    method, base, options = config
    opt = flatminima.create(method, run.parameters(), base, lr=0.2, **options, **extra, **more)
    out: dict[str, Any] = {}
    start = 0
    if load:
        sd = {"model": get_model_state_dict(run), "optim": get_optimizer_state_dict(run, opt)}
        dcp.load(sd, checkpoint_id=load)
        set_model_state_dict(run, sd["model"])
        set_optimizer_state_dict(run, opt, sd["optim"])
        start = DCP_SAVE_AT
    for i in range(start, STEPS):
        if i == DCP_SAVE_AT and save:
            sd = {"model": get_model_state_dict(run), "optim": get_optimizer_state_dict(run, opt)}
            out["saved"] = {section: {fqn: {k: type(v).__name__ for k, v in entry.items()}
                                      for fqn, entry in sd["optim"][section].items()} for section in ("state", "method")}
            dcp.save(sd, checkpoint_id=save)
        x, y = (t.chunk(WORLD)[rank] for t in _data(i))
        opt.step(_closure(method, opt, run, x, y))
    out["params"] = [_local(p) for p in run.parameters()]
    out["state"] = {k: v for k, v in opt.state_dict()["flatminima"].items() if k != "shapes"}
    out["base"] = [{k: _local(v) for k, v in s.items()} for s in opt.state_dict()["base"]["state"].values()]
    return out


def _dcp(rank: int, out_dir: str) -> dict[str, Any]:
    """Per config: the uninterrupted run, the run that saves a checkpoint, the run resumed from it,
    under FSDP2 and DDP; the refusals (state that differs between the ranks, FSDP1, ZeRO)."""
    from flatminima.distributed import get_optimizer_state_dict

    out: dict[str, Any] = {}
    configs = {f"fsdp2/{n}": ("fsdp2", c) for n, c in DCP_CONFIGS.items()}
    configs["ddp/sam"] = ("ddp", DCP_CONFIGS["sam"])  # per-replica eps
    configs["ddp/friendly_sam"] = ("ddp", DCP_CONFIGS["friendly_sam"])  # m: averaged over the replicas
    for name, (kind, config) in configs.items():
        path = os.path.join(out_dir, "dcp-" + name.replace("/", "-"))
        out[name] = {
            "plain": _guarded(_dcp_run, kind, config, rank),
            "saving": _guarded(_dcp_run, kind, config, rank, path),
            "resumed": _guarded(_dcp_run, kind, config, rank, None, path),
        }
    esam = ("esam", torch.optim.SGD, {"rho": 0.5, "beta": 0.5, "gamma": 1.0})  # each rank its own mask seed
    out["ddp/esam-seed-per-rank"] = _guarded(lambda: _dcp_run("ddp", esam, rank, os.path.join(out_dir, "x"), seed=rank))
    refusals: dict[str, str] = {}
    run, _ = _wrap("fsdp1-orig")
    opt = _opt("sam", run.parameters(), model=run)
    try:
        get_optimizer_state_dict(run, opt)
        refusals["fsdp1"] = "no error"
    except ValueError as e:
        refusals["fsdp1"] = str(e)
    from torch.distributed.optim import ZeroRedundancyOptimizer

    model = _model()
    ddp = nn.parallel.DistributedDataParallel(model)
    zero = flatminima.create("sam", model.parameters(), ZeroRedundancyOptimizer, optimizer_class=torch.optim.SGD,
                             lr=0.2, momentum=0.9, model=ddp)
    try:
        get_optimizer_state_dict(ddp, zero)
        refusals["zero"] = "no error"
    except ValueError as e:
        refusals["zero"] = str(e)
    out["refusals"] = refusals
    return out


def _worker(rank: int, init_file: str, out_dir: str, scenarios: list[str]) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    try:
        for scenario in scenarios:
            try:
                if scenario == "refusals":
                    results[scenario] = _refusals(rank)
                elif scenario == "zero":
                    results[scenario] = _zero(rank)
                elif scenario == "dcp":
                    results[scenario] = _dcp(rank, out_dir)
                elif scenario == "bench":  # benchmarks/distributed.py's per-rank part, tiny
                    from benchmarks.distributed import run_rank

                    results[scenario] = run_rank(rank, tiny=True, reps=1, warmup=0)
                else:
                    results[scenario] = {
                        name: _guarded(_run, scenario, name, rank)
                        for name in METHODS
                        if not (scenario.startswith("fsdp1") and name in WHOLE_TENSORS)
                    }
            except Exception:  # recorded: the parent reports it against the scenario
                results[scenario] = traceback.format_exc()
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp), [*SHARDINGS, "refusals", "zero", "dcp", "bench"]), nprocs=WORLD, join=True)
    return [{**torch.load(tmp / f"rank{r}.pt", weights_only=False), "dir": tmp} for r in range(WORLD)]


CASES = [(kind, name) for kind in SHARDINGS for name in METHODS if not (kind.startswith("fsdp1") and name in WHOLE_TENSORS)]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_fsdp_step_is_the_full_batch_step(ranks: list[dict[str, Any]], kind: str, name: str) -> None:
    for r in range(WORLD):
        got = ranks[r][kind]
        assert not isinstance(got, str), got
        assert not isinstance(got[name], str), got[name]
        want = full_batch(name)
        diff = max(float((a - b).abs().max()) for a, b in zip(got[name]["params"], want["params"]))
        assert diff <= 1e-6, f"{kind}/{name} rank {r}: max |w - w_full_batch| = {diff:.3e}"
        assert got[name]["counters"] == want["counters"], f"{kind}/{name} rank {r}: the skip decisions differ"
        if name in INVARIANT:
            assert abs(got[name]["invariant"] - METHODS[name][1]["rho"]) <= 1e-6, (kind, name, got[name]["invariant"])


@pytest.mark.parametrize("name", sorted(WHOLE_TENSORS))
def test_fsdp1_refuses_what_needs_whole_tensors(ranks: list[dict[str, Any]], name: str) -> None:
    msg = ranks[0]["refusals"][name]
    assert "cannot run under FSDP1" in msg and WHOLE_TENSORS[name] in msg and "fully_shard" in msg, msg


def test_fsdp1_without_model_and_chunks_under_fsdp2_are_refused(ranks: list[dict[str, Any]]) -> None:
    out = ranks[0]["refusals"]
    assert "FSDP1 shards" in out["no-model"] and "model=<the FSDP module>" in out["no-model"], out["no-model"]
    assert "chunks=" in out["chunks"] and "one global eps" in out["chunks"], out["chunks"]
    assert "a GradScaler under FSDP2 is not supported: use bf16 autocast" in out["scaler"], out["scaler"]
    assert out["scaler_moved"] == "False"  # refused before anything moved


def test_zero_redundancy_optimizer_as_the_base(ranks: list[dict[str, Any]]) -> None:
    """Sharding the base optimizer's state (ZeRO-1) changes no value: per-replica and global eps alike."""
    for r in range(WORLD):
        assert ranks[r]["zero"] == {"sync=False": 0.0, "sync=True": 0.0}, ranks[r]["zero"]


def test_fsdp2_torchrun_example(tmp_path: Path) -> None:
    """examples/fsdp2_sam.py under ``torchrun --nproc-per-node 2``: it compares its FSDP2 run with the
    single-process full-batch run of the same method itself, and with the run resumed from its checkpoint."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "fsdp2_sam.py"), "--steps", "5", "--method", "looksam", "--checkpoint", "ckpt"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    diff = re.search(r"max \|w_fsdp2 - w_full_batch\| = (\S+)", out.stdout)
    assert diff is not None and float(diff.group(1)) <= 1e-6, out.stdout
    assert "resumed from ckpt at step 2: bit-identical to the uninterrupted run: True" in out.stdout, out.stdout


# ---------------------------------------------------------------------- distributed checkpoints
DCP_CASES = [*(f"fsdp2/{n}" for n in DCP_CONFIGS), "ddp/sam", "ddp/friendly_sam"]


@pytest.mark.parametrize("name", DCP_CASES)
def test_dcp_resumed_run_is_the_uninterrupted_run(ranks: list[dict[str, Any]], name: str) -> None:
    """Saving after 2 steps changes nothing, and a fresh model and optimizer loaded from the
    checkpoint take the remaining steps bit for bit (weights, base state, counters, method state)."""
    for r in range(WORLD):
        got = ranks[r]["dcp"]
        assert not isinstance(got, str), got
        runs = got[name]
        for which in ("plain", "saving", "resumed"):
            assert not isinstance(runs[which], str), runs[which]
        for which in ("saving", "resumed"):
            assert all(torch.equal(a, b) for a, b in zip(runs["plain"]["params"], runs[which]["params"])), (name, which, r)
            assert runs[which]["state"] == runs["plain"]["state"], (name, which, r)
            base = [torch.equal(a[k], b[k]) for a, b in zip(runs["plain"]["base"], runs[which]["base"]) for k in a]
            assert all(base) and len(runs[which]["base"]) == len(runs["plain"]["base"]), (name, which, r)


def test_dcp_checkpoint_holds_sharded_momentum_and_method_state(ranks: list[dict[str, Any]]) -> None:
    saved = ranks[0]["dcp"]["fsdp2/looksam"]["saving"]["saved"]
    assert saved["state"] == {n: {"momentum_buffer": "DTensor"} for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    assert saved["method"] == {n: {"g_v": "DTensor"} for n in ("0.weight", "0.bias", "2.weight", "2.bias")}
    adam = ranks[0]["dcp"]["fsdp2/sam-adam"]["saving"]["saved"]["state"]["0.weight"]
    assert adam == {"step": "Tensor", "exp_avg": "DTensor", "exp_avg_sq": "DTensor"}  # the step count: one copy


def test_dcp_fsdp2_checkpoint_resumes_in_one_process(ranks: list[dict[str, Any]]) -> None:
    """DCP reshards: the FSDP2 checkpoint of two ranks loads into a plain model in one process, whose
    remaining (full-batch) steps end where the FSDP2 run ended, to 1e-6 (float32)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        set_model_state_dict,
    )

    from flatminima.distributed import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    method, base, options = DCP_CONFIGS["looksam"]
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = flatminima.create(method, model.parameters(), base, lr=0.2, **options)
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=ranks[0]["dir"] / "dcp-fsdp2-looksam")
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    for i in range(DCP_SAVE_AT, STEPS):
        opt.step(_closure(method, opt, model, *_data(i)))
    want = ranks[0]["dcp"]["fsdp2/looksam"]["plain"]
    assert opt.state_dict()["flatminima"]["counters"] == want["state"]["counters"]
    full = [torch.cat([ranks[r]["dcp"]["fsdp2/looksam"]["plain"]["params"][i] for r in range(WORLD)]) for i in range(4)]
    assert max(float((a.detach() - b).abs().max()) for a, b in zip(model.parameters(), full)) <= 1e-6


def test_dcp_refuses_what_it_cannot_save(ranks: list[dict[str, Any]]) -> None:
    seeds = ranks[0]["dcp"]["ddp/esam-seed-per-rank"]
    assert isinstance(seeds, str) and "ESAM: the counters, method-level state and param groups differ between the ranks" in seeds, seeds
    assert "keeps one copy of what is not sharded" in seeds and "pass the same value on every rank" in seeds, seeds
    out = ranks[0]["dcp"]["refusals"]
    assert "under FSDP1" in out["fsdp1"] and "use FSDP2 (torch.distributed.fsdp.fully_shard)" in out["fsdp1"], out
    assert "ZeroRedundancyOptimizer as the base" in out["zero"] and "consolidate_state_dict(to=0)" in out["zero"], out


def test_benchmark_fsdp2_holds_half_of_ddps_bytes(ranks: list[dict[str, Any]]) -> None:
    """benchmarks/distributed.py, tiny: at the step's peak a DDP rank holds every parameter, its
    gradient and the w kept aside whole (4 bytes each, plus a scalar kept) and the momentum; an FSDP2
    rank holds half of each (two ranks, even dimensions)."""
    from benchmarks.distributed import SETUPS, render, summarize

    for r in range(WORLD):
        got = ranks[r]["bench"]
        assert not isinstance(got, str), got
        whole = 4 * got["params"]
        for kind in ("ddp/sam", "ddp/sam-sync"):
            assert got["bytes"][kind] == {"params": whole, "grads": whole, "kept": whole + 4, "base_state": whole}, kind
        assert got["bytes"]["fsdp2/sam"] == {"params": whole // 2, "grads": whole // 2, "kept": whole // 2 + 4,
                                             "base_state": whole // 2}
        assert sorted(got["seconds"]) == sorted(SETUPS) and all(len(v) == 1 for v in got["seconds"].values())
    res = summarize([ranks[r]["bench"] for r in range(WORLD)])
    assert abs(res["fsdp2_vs_ddp"]["step_bytes"] - 0.5) < 1e-3
    res["meta"] = {"reps": 1, "width": 32, "depth": 2, "batch": 8}
    assert "FSDP2 / DDP (sync, the same step): parameter, gradient and eps bytes x0.500" in render(res)
