"""DDP: two processes, gloo on CPU (``torch.multiprocessing.spawn``).

Per-replica perturbation (the default, the paper's m-sharpness): every rank
perturbs with its own gradient, the clean pass runs under ``no_sync()`` and
only the perturbed gradient is averaged. For every configuration of
methods_db, through ``step(closure)`` with ``model=`` the DDP module and
through the explicit API with ``opt.clean_pass()`` (guarded by first_step(),
and the popular snippet's unguarded loop):

* the two ranks end bit-identical (weights and optimizer state), and
* they equal the single-process reference of the same semantics
  (tests/reference.py ``sharded_step``: eps per shard, gradients averaged)
  to 1e-10, and, bit for bit, the library's single-process run of those
  semantics, ``step(closure, chunks=2)`` with chunk ``r`` = rank ``r``'s
  shard (DDP's ``g/2 + g'/2`` and the chunks' ``(g + g')/2`` round alike).

``sync_perturbations=True`` (one global eps) equals the plain full-batch
step, and a GradScaler under DDP equals the unscaled run.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import flatminima
import helpers
from methods_db import CASES, Case
from test_reference import build_pair

STEPS = 3
WORLD = 2

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


def _shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t.chunk(WORLD)[rank]


def _run_case(case: Case, rank: int, mode: str) -> dict[str, Any]:
    """One configuration for STEPS steps on this rank's shard."""
    model, _, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    ddp = nn.parallel.DistributedDataParallel(model)
    extra = {"sync_perturbations": True} if mode == "sync" else {}
    groups = helpers.two_groups(model, **case.second_group)
    opt = flatminima.create(case.method, groups, torch.optim.SGD, lr=0.1, momentum=0.9, model=ddp, **case.kwargs, **extra)
    schedulers = [case.scheduler(opt)] if case.scheduler else []
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1) if mode == "scaler" else None
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        xr, yr = _shard(x, rank), _shard(y, rank)
        torch.manual_seed(1000 + i)
        if mode == "explicit" and helpers.pre_pass(case.method):  # its order: first_step, its only backward
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(ddp(xr), yr).backward()
            opt.second_step(zero_grad=True)
        elif mode == "explicit":
            with opt.clean_pass():
                nn.functional.cross_entropy(ddp(xr), yr).backward()
            if opt.first_step(zero_grad=True):
                nn.functional.cross_entropy(ddp(xr), yr).backward()
            opt.second_step(zero_grad=True)
        elif mode == "snippet":  # the popular snippet: the second (synced) backward whatever first_step() says
            with opt.clean_pass():
                nn.functional.cross_entropy(ddp(xr), yr).backward()
            opt.first_step(zero_grad=True)
            nn.functional.cross_entropy(ddp(xr), yr).backward()
            opt.second_step(zero_grad=True)
        elif mode == "scaler":
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.cross_entropy(ddp(xr), yr)
                sc.scale(loss).backward()
                return loss

            opt.step(closure, scaler=sc)
        else:
            opt.step(helpers.make_closure(opt, ddp, xr, yr, case.closure))
        for s in schedulers:
            s.step()
    return {"params": helpers.params_of(model), "state": opt.state_dict()}


MODES = {
    "closure": CASES,
    "explicit": [c for c in CASES if c.closure == "loss"],
    "sync": CASES,
    # the configurations with steps that skip the perturbed pass (and the pre-pass method)
    "snippet": [
        c for c in CASES
        if c.closure == "loss" and (c.closure_calls is None or 1 in c.closure_calls or helpers.pre_pass(c.method))
    ],
    # sam, sam-rho0.3, asam+gc (the sam record), asam-eta0.01
    "scaler": [c for c in CASES if c.closure == "loss"][:4],
}


class _Branchy(nn.Module):
    """A head that rank 1 never uses: its parameters get gradients on rank 0 only."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body, self.extra = nn.Linear(6, 3).double(), nn.Linear(3, 3).double()

    def forward(self, x: torch.Tensor, use_extra: bool) -> torch.Tensor:
        h = self.body(x)
        return h + self.extra(h) if use_extra else h


def _unused_parameters(rank: int) -> dict[str, Any]:
    """DDP(find_unused_parameters=True) with a head unused on rank 1, as DDP
    treats it: a gradient present on some ranks only counts zero on the
    others. Steps with a perturbed pass get DDP's averaged g_p (the kept
    clean gradient of a parameter without one is 0); steps without one
    (SAM every 2 steps) average the clean gradients over the union of
    parameters, as does AE-SAM's decision (it then perturbs with its own
    gradient, 0 for the unused head). VaSSO's per-replica state of the unused head exists on rank
    0 only: a clear error on every rank, not a hang."""
    out: dict[str, Any] = {}
    for name, kwargs in (("sam", {}), ("wsam", {}), ("sam_every_k", {"k": 2}), ("ae_sam", {"sam_fraction": 1.0}), ("vasso", {})):
        model = _Branchy()
        ddp = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        opt = flatminima.create(name, model.parameters(), torch.optim.SGD, lr=0.1, model=ddp, **kwargs)
        try:
            for x, y in helpers.batches(2, torch.float64):
                xr, yr = _shard(x, rank), _shard(y, rank)

                def closure() -> torch.Tensor:
                    opt.zero_grad()
                    loss = nn.functional.cross_entropy(ddp(xr, rank == 0), yr)
                    loss.backward()
                    return loss

                opt.step(closure)
            out[name] = helpers.params_of(model)
        except ValueError as e:
            out[name] = str(e)
    return out


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        results: dict[str, Any] = {mode: {c.id: _run_case(c, rank, mode) for c in cases} for mode, cases in MODES.items()}
        results["unused"] = _unused_parameters(rank)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=True)
    return [torch.load(tmp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _chunked_run(case: Case) -> list[torch.Tensor]:
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = [case.scheduler(opt)] if case.scheduler else []
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(1000 + i)
        opt.step(helpers.chunk_closure(opt, model, x, y, WORLD, case.closure), chunks=WORLD)
        for s in schedulers:
            s.step()
    return helpers.params_of(model)


def _reference_run(case: Case) -> list[torch.Tensor]:
    """tests/reference.py's ``sharded_step`` (eps per shard, gradients
    averaged), written from docs/algorithms.md without the library."""
    _, _, ref_model, ref = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = [case.scheduler(ref.base)] if case.scheduler else []
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(1000 + i)
        ref.sharded_step(helpers.shard_closures(ref.base, ref_model, x, y, WORLD, case.closure))
        for s in schedulers:
            s.step()
    return helpers.params_of(ref_model)


def _full_batch_run(case: Case) -> list[torch.Tensor]:
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = [case.scheduler(opt)] if case.scheduler else []
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(1000 + i)
        opt.step(helpers.make_closure(opt, model, x, y, case.closure))
        for s in schedulers:
            s.step()
    return helpers.params_of(model)


@pytest.mark.parametrize(("mode", "case"), [(m, c) for m, cs in MODES.items() for c in cs], ids=lambda v: getattr(v, "id", v))
def test_ranks_end_bit_identical(ranks: list[dict[str, Any]], mode: str, case: Case) -> None:
    a, b = ranks[0][mode][case.id], ranks[1][mode][case.id]
    helpers.assert_tree_equal(a["params"], b["params"])
    helpers.assert_tree_equal(a["state"], b["state"])
    assert a["state"]["flatminima"]["counters"]["steps"] == STEPS


@pytest.mark.parametrize(
    ("mode", "case"),
    [(m, c) for m in ("closure", "explicit", "snippet", "scaler") for c in MODES[m]],
    ids=lambda v: getattr(v, "id", v),
)
def test_per_replica_equals_single_process_chunks(ranks: list[dict[str, Any]], mode: str, case: Case) -> None:
    got = ranks[0][mode][case.id]["params"]
    want = _chunked_run(case)
    diff = helpers.max_abs_diff(got, want)
    assert diff == 0.0, f"{case.id}/{mode}: DDP vs chunks=2: max |w - w_ref| = {diff:.3e}"
    diff = helpers.max_abs_diff(got, _reference_run(case))
    assert diff <= 1e-10, f"{case.id}/{mode}: DDP vs the reference's sharded_step: {diff:.3e}"
    full = _full_batch_run(case)
    if helpers.pre_pass(case.method):  # eps from the momentum, the same on every replica: the global step
        assert helpers.max_abs_diff(got, full) <= 1e-10, f"{case.id}: a pre-pass eps differs between replicas"
    elif ranks[0][mode][case.id]["state"]["flatminima"]["counters"]["perturbed_steps"]:
        assert helpers.max_abs_diff(got, full) > 1e-9, f"{case.id}: per-replica eps gave the global-eps step"


# Per-sample closures select samples on each replica's shard (ESAM's
# top-gamma|B_r|), which no full-batch step does: the PyTorch-form cases only.
@pytest.mark.parametrize("case", [c for c in CASES if c.closure == "loss"], ids=lambda c: c.id)
def test_sync_perturbations_is_the_full_batch_step(ranks: list[dict[str, Any]], case: Case) -> None:
    got = ranks[0]["sync"][case.id]["params"]
    diff = helpers.max_abs_diff(got, _full_batch_run(case))
    assert diff <= 1e-12, f"{case.id}: sync_perturbations vs the full batch: {diff:.3e}"


def test_torchrun_example(tmp_path: Path) -> None:
    """examples/ddp_sam.py under ``torchrun --nproc-per-node 2`` (its own
    check: both ranks print the same weight checksum)."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           str(root / "examples" / "ddp_sam.py"), "--steps", "5"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    # the two ranks share one stdout: their lines may interleave, so no line-based parsing
    sums = dict(re.findall(r"checksum rank (\d) (-?[0-9.e+-]+)", out.stdout))
    assert sorted(sums) == ["0", "1"] and sums["0"] == sums["1"], out.stdout


def test_unused_parameters_error_instead_of_a_hang(ranks: list[dict[str, Any]]) -> None:
    a, b = ranks[0]["unused"], ranks[1]["unused"]
    for name in ("sam", "wsam", "sam_every_k", "ae_sam"):  # ae_sam: decides from the mean, perturbs from its own
        assert not isinstance(a[name], str), a[name]
        helpers.assert_tree_equal(a[name], b[name])
    for msg in (a["vasso"], b["vasso"]):
        assert isinstance(msg, str) and "cover different parameters" in msg and "sync_perturbations=True" in msg
