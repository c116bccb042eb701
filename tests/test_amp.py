"""Mixed precision: ``step(closure, scaler=...)`` and
``first_step(scaler=...)``/``second_step()`` with ``torch.amp.GradScaler``,
and bf16 autocast without a scaler. On CPU (``torch.autocast("cpu")``,
``GradScaler("cpu")``); the same code runs on CUDA.

The sharpest check: with a power-of-two scale, scaling and unscaling are
exact, so a scaled run must equal the unscaled run bit for bit (for every
configuration of methods_db), and the scale must grow exactly once per
step (``growth_interval=1``).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import pytest
import torch
from torch import nn

import flatminima
import helpers
from methods_db import CASES, DEFAULT_CASES, Case, build_schedulers
from test_reference import build_pair

STEPS = 4


def scaler(init: float = 2.0**10) -> torch.amp.GradScaler:
    return torch.amp.GradScaler("cpu", init_scale=init, growth_interval=1)


def scaled_closure(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, sc: Any, kind: str) -> Callable[..., Any]:
    """``helpers.make_closure`` with ``scaler.scale(loss).backward()`` (the
    per-sample form leaves the backward, and so the scaling, to the optimizer)."""
    if kind == "per_sample":
        return helpers.make_closure(opt, model, x, y, kind)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        sc.scale(loss).backward()
        return loss

    return closure


@pytest.mark.parametrize("api", ["closure", "explicit", "snippet", "chunks"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_scaled_run_equals_unscaled_run(case: Case, api: str) -> None:
    if api in ("explicit", "snippet") and case.closure != "loss":
        pytest.skip("the explicit per-sample protocol calls backward itself (tests/helpers.explicit_step)")
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = build_schedulers(case, opt, opt2)
    sc = scaler()
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(i)
        if api == "closure":
            opt.step(helpers.make_closure(opt, model, x, y, case.closure))
            torch.manual_seed(i)
            opt2.step(scaled_closure(opt2, model2, x, y, sc, case.closure), scaler=sc)
        elif api == "chunks":
            opt.step(helpers.chunk_closure(opt, model, x, y, 2, case.closure), chunks=2)
            xs, ys = x.chunk(2), y.chunk(2)
            torch.manual_seed(i)
            opt2.step(lambda j, *a: scaled_closure(opt2, model2, xs[j], ys[j], sc, case.closure)(*a), scaler=sc, chunks=2)
        elif api == "snippet":  # the popular snippet: a second (scaled) backward whatever first_step() says
            helpers.explicit_step(opt, model, x, y)
            torch.manual_seed(i)
            sc.scale(nn.functional.cross_entropy(model2(x), y)).backward()
            opt2.first_step(zero_grad=True, scaler=sc)
            sc.scale(nn.functional.cross_entropy(model2(x), y)).backward()
            opt2.second_step(zero_grad=True)
        elif helpers.pre_pass(case.method):  # its order: first_step, then its only (scaled) backward
            helpers.explicit_step(opt, model, x, y)
            torch.manual_seed(i)
            opt2.first_step(zero_grad=True, scaler=sc)
            sc.scale(nn.functional.cross_entropy(model2(x), y)).backward()
            opt2.second_step(zero_grad=True)
        else:
            helpers.explicit_step(opt, model, x, y)
            torch.manual_seed(i)
            sc.scale(nn.functional.cross_entropy(model2(x), y)).backward()
            if opt2.first_step(zero_grad=True, scaler=sc):
                sc.scale(nn.functional.cross_entropy(model2(x), y)).backward()
            opt2.second_step(zero_grad=True)
        for s in schedulers:
            s.step()
        assert sc.get_scale() == 2.0 ** (10 + i + 1), f"{case.id}: the scale must grow once per step"
    helpers.assert_tree_equal(helpers.params_of(model2), helpers.params_of(model))
    helpers.assert_tree_equal(opt2.state_dict(), opt.state_dict())


@pytest.mark.parametrize("where", ["clean", "perturbed"])
@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.id)
def test_overflow_skips_the_step_and_backs_off_once(case: Case, where: str) -> None:
    """An inf in either pass: weights restored exactly, base and method state
    untouched, the scale halved once, a perturbed pass not run after an
    overflow in the clean pass."""
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    sc = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    data = helpers.batches(2, torch.float64)
    x, y = data[0]
    opt.step(scaled_closure(opt, model, x, y, sc, case.closure), scaler=sc)  # some state to keep
    w0, state0, scale0 = helpers.params_of(model), helpers.clone_tree(opt.state_dict()), sc.get_scale()
    x, y = data[1]
    inner = scaled_closure(opt, model, x, y, sc, case.closure)
    calls = []

    def closure(*args: Any) -> torch.Tensor:
        calls.append(args)
        out = inner(*args)
        if (where == "clean") == (len(calls) == 1):
            next(model.parameters()).grad[0, 0] = float("inf")  # the backward overflowed
        return out

    if case.closure == "per_sample":
        pytest.skip("the per-sample form's backward runs inside the optimizer; covered by test_nonfinite")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure, scaler=sc)
    if where == "perturbed" and len(calls) == 1:
        pytest.skip(f"{case.id}: no perturbed pass at this step")
    assert any("non-finite" in str(w.message) for w in caught)
    assert len(calls) == (1 if where == "clean" else 2)
    assert sc.get_scale() == scale0 / 2
    assert opt.skipped_steps == 1
    helpers.assert_tree_equal(helpers.params_of(model), w0)
    state = opt.state_dict()
    state["flatminima"]["counters"] = state0["flatminima"]["counters"]
    helpers.assert_tree_equal(state, state0)
    # and the next step runs normally, at the lower scale
    opt.step(scaled_closure(opt, model, x, y, sc, case.closure), scaler=sc)
    assert opt.step_count == 2 and sc.get_scale() == scale0 / 2


@pytest.mark.parametrize("case", [c for c in CASES if c.closure == "loss"], ids=lambda c: c.id)
def test_bf16_autocast_matches_reference(case: Case) -> None:
    """bf16 autocast, no scaler: float32 weights, every pass under autocast;
    the library matches the reference fed the same autocast closure."""
    model, opt, ref_model, ref = build_pair(case, "sgd-momentum", case.second_group)
    model, ref_model = model.float(), ref_model.float()
    schedulers = build_schedulers(case, opt, ref.base)

    def closure_of(o: Any, m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], torch.Tensor]:
        def closure() -> torch.Tensor:
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            return loss

        return closure

    w0 = helpers.params_of(model)
    for x, y in helpers.batches(3, torch.float32):
        opt.step(closure_of(opt, model, x, y))
        ref.step(closure_of(ref.base, ref_model, x, y))
        for s in schedulers:
            s.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())
    diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(ref_model))
    assert diff <= 1e-5, f"{case.id}: max |w - w_ref| = {diff:.3e}"
    assert helpers.max_abs_diff(helpers.params_of(model), w0) > 1e-3


@pytest.mark.filterwarnings("ignore:.*non-finite gradient:RuntimeWarning")  # the first scale overflows fp16
def test_fp16_autocast_with_scaler_trains() -> None:
    """fp16 autocast on CPU with a GradScaler: the two APIs take the same
    steps, the weights stay float32 and finite, and the loss falls."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 3))
    model2 = helpers.clone(model)
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    opt2 = flatminima.SAM(model2.parameters(), torch.optim.SGD, rho=0.05, lr=0.5)
    sc, sc2 = scaler(2.0**14), scaler(2.0**14)
    x = torch.randn(128, 6, generator=torch.Generator().manual_seed(1))
    y = (x @ torch.randn(6, 3, generator=torch.Generator().manual_seed(2))).argmax(1)  # learnable

    def forward(m: nn.Module) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            out = m(x)
        assert out.dtype == torch.float16
        return nn.functional.cross_entropy(out.float(), y)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = forward(model)
        sc.scale(loss).backward()
        return loss

    losses = []
    for _ in range(20):
        losses.append(float(opt.step(closure, scaler=sc).detach()))
        sc2.scale(forward(model2)).backward()
        if opt2.first_step(zero_grad=True, scaler=sc2):
            sc2.scale(forward(model2)).backward()
        opt2.second_step(zero_grad=True)
    helpers.assert_tree_equal(helpers.params_of(model2), helpers.params_of(model))
    assert sc.get_scale() == sc2.get_scale()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < 0.9 * losses[0]


def test_cancelled_step_leaves_the_scaler_as_it_was() -> None:
    case = DEFAULT_CASES[0]
    model, opt, _, _ = build_pair(case, "sgd", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd", case.second_group)
    sc, sc2 = scaler(), scaler()
    x, y = helpers.batches(1, torch.float64)[0]
    inner = scaled_closure(opt, model, x, y, sc, "loss")
    calls = []

    def failing() -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return inner()

    with pytest.raises(KeyboardInterrupt):
        opt.step(failing, scaler=sc)
    assert sc.get_scale() == 2.0**10
    opt.step(inner, scaler=sc)  # would raise "unscale_() has already been called" on a stale record
    opt2.step(scaled_closure(opt2, model2, x, y, sc2, "loss"), scaler=sc2)
    helpers.assert_tree_equal(helpers.params_of(model), helpers.params_of(model2))
    assert sc.get_scale() == sc2.get_scale() == 2.0**11


def test_disabled_scaler_is_a_no_op() -> None:
    case = DEFAULT_CASES[0]
    model, opt, _, _ = build_pair(case, "sgd", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd", case.second_group)
    x, y = helpers.batches(1, torch.float64)[0]
    opt.step(helpers.make_closure(opt, model, x, y), scaler=torch.amp.GradScaler("cpu", enabled=False))
    opt2.step(helpers.make_closure(opt2, model2, x, y))
    helpers.assert_tree_equal(helpers.params_of(model), helpers.params_of(model2))


def test_scaler_of_wrong_type() -> None:
    case = DEFAULT_CASES[0]
    model, opt, _, _ = build_pair(case, "sgd", case.second_group)
    x, y = helpers.batches(1, torch.float64)[0]
    w0 = helpers.params_of(model)
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler, got float"):
        opt.step(helpers.make_closure(opt, model, x, y), scaler=2.0)  # type: ignore[arg-type]
    helpers.assert_tree_equal(helpers.params_of(model), w0)
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    with pytest.raises(TypeError, match="scaler must be a torch.amp.GradScaler"):
        opt.first_step(scaler="yes")  # type: ignore[arg-type]
    assert opt.first_step() is True  # nothing was left pending
    opt.cancel_step()


def test_abandoned_step_leaves_a_shared_scaler_alone() -> None:
    """One GradScaler for two optimizers: another optimizer's ``unscale_``
    record survives a cancelled sharpness-aware step, so its ``scaler.step``
    does not unscale twice (the step tells the scaler nothing until taken)."""
    torch.manual_seed(0)
    ours, theirs = nn.Linear(4, 2), nn.Linear(4, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt = flatminima.SAM(ours.parameters(), torch.optim.SGD, lr=0.1)
    other = torch.optim.SGD(theirs.parameters(), lr=0.1)
    x = torch.randn(8, 4)
    scaler.scale(theirs(x).pow(2).mean()).backward()
    true_grad = theirs.weight.grad.detach().clone() / 1024.0
    scaler.unscale_(other)
    scaler.scale(ours(x).pow(2).mean()).backward()
    assert opt.first_step(scaler=scaler)
    opt.cancel_step()
    w_before = theirs.weight.detach().clone()
    scaler.step(other)  # must not unscale again
    torch.testing.assert_close(theirs.weight.detach(), w_before - 0.1 * true_grad)
    scaler.update()
    assert scaler.get_scale() == 1024.0
