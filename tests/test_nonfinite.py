"""A non-finite gradient in either pass skips the whole step: weights, the base
optimizer's state and the method's state stay exactly as they were, the skip
is counted (not as a step) and warned about once, and training then goes on
exactly as if the bad batch had never been seen."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import flatminima
from helpers import assert_tree_equal, batches, clone_tree, closure_for, mlp, one_case_per_method, params_of, pre_pass
from methods_db import CASES

PER_METHOD = one_case_per_method(CASES)

DTYPE = torch.float64
WARM = 2  # good steps before the bad one, so the base optimizer has state
MODES = ["nan_loss", "inf_loss", "inf_grad", "nan_grad"]
PASSES = {"clean": 1, "perturbed": 2}  # which call of the closure goes bad


def build(case):
    model = mlp(dtype=DTYPE, seed=0)
    opt = flatminima.create(
        case.method, model.parameters(), torch.optim.SGD, **case.kwargs, lr=0.05, momentum=0.9, weight_decay=1e-3
    )
    return model, opt


def run_step(opt, closure, api: str) -> bool | None:
    """One step through ``api``; first_step()'s answer (None with the closure API)."""
    if api == "closure":
        opt.step(closure)
        return None
    if api == "explicit":  # the explicit API, following first_step()'s return value
        closure()
        if perturbed := opt.first_step():
            closure()
        opt.second_step()
        return perturbed
    # "snippet": the popular snippet's loop, which always runs the second pass
    closure()
    perturbed = opt.first_step(zero_grad=True)
    closure()
    opt.second_step(zero_grad=True)
    return perturbed


def good_step(opt, model, x, y, api: str, seed: int) -> None:
    torch.manual_seed(seed)
    run_step(opt, closure_for(opt, model, x, y)[0], api)


def all_finite(model: nn.Module) -> bool:
    return all(torch.isfinite(p).all() for p in model.parameters())


def state_without_counters(opt) -> dict:
    sd = clone_tree(opt.state_dict())
    sd["flatminima"].pop("counters")
    return sd


def runtime_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning)]


# every method x every (api, kind of bad value) x both passes; every
# configuration of CASES with the closure API and a NaN loss
COMBOS = [("closure", "nan_loss"), ("explicit", "inf_grad"), ("snippet", "inf_loss"), ("closure", "nan_grad")]
SKIP_PARAMS = [
    pytest.param(case, where, api, mode, id=f"{case.id}-{where}-{api}-{mode}")
    for case in PER_METHOD
    for where in PASSES
    for api, mode in COMBOS
] + [
    pytest.param(case, where, "closure", "nan_loss", id=f"{case.id}-{where}-closure-nan_loss")
    for case in CASES
    if case not in PER_METHOD and case.closure == "loss"  # the closures here are PyTorch's form
    for where in PASSES
]


@pytest.mark.parametrize(("case", "where", "api", "mode"), SKIP_PARAMS)
def test_nonfinite_step_is_skipped(case, where, mode, api):
    data = batches(WARM + 3, dtype=DTYPE, size=16)
    model, opt = build(case)
    for i in range(WARM):
        good_step(opt, model, *data[i], api, seed=i)
    assert opt.step_count == WARM and opt.skipped_steps == 0

    w0 = params_of(model)
    base0 = clone_tree(opt.base_optimizer.state_dict())
    own0 = state_without_counters(opt)
    counters0 = dict(opt.counters)
    assert base0["state"], "the base optimizer should have momentum buffers by now"

    x_bad, y_bad = data[WARM]
    closure, calls = closure_for(opt, model, x_bad, y_bad, PASSES[where], mode)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(100)
        perturbed = run_step(opt, closure, api)
    if api == "snippet" and where == "perturbed" and perturbed is False and not pre_pass(case.method):
        # no eps this step: second_step() used the clean gradients set aside, not the pass that went bad
        assert opt.step_count == WARM + 1 and all_finite(model) and runtime_warnings(record) == []
        return
    if calls[0] < PASSES[where]:
        pytest.skip("this configuration runs no perturbed pass on this step")
    if pre_pass(case.method) and api != "closure" and where == "clean":
        # its order is first_step() before its only backward: a backward run before first_step() is discarded
        assert opt.step_count == WARM + 1 and all_finite(model)
        return
    found = runtime_warnings(record)
    assert len(found) == 1, [str(w.message) for w in record]
    # a pre-pass method's only pass (after the first step) is at w + eps
    said = "perturbed" if pre_pass(case.method) else where
    assert "non-finite" in str(found[0].message) and said in str(found[0].message)

    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    assert_tree_equal(opt.base_optimizer.state_dict(), base0, "base")
    assert_tree_equal(state_without_counters(opt), own0, "own")
    assert opt.skipped_steps == counters0["skipped_steps"] + 1
    assert opt.step_count == counters0["steps"]
    assert opt.perturbed_steps == counters0["perturbed_steps"]
    assert opt._pending is None

    # a second skip is counted but not warned about again
    closure, calls = closure_for(opt, model, x_bad, y_bad, PASSES[where], mode)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        torch.manual_seed(101)
        run_step(opt, closure, api)
    assert runtime_warnings(record) == []
    assert opt.skipped_steps == counters0["skipped_steps"] + 2
    assert opt.step_count == counters0["steps"]
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)

    # training goes on exactly as a run that never saw the bad batch
    ref_model, ref_opt = build(case)
    for i in range(WARM):
        good_step(ref_opt, ref_model, *data[i], api, seed=i)
    for i in range(WARM + 1, WARM + 3):
        good_step(opt, model, *data[i], api, seed=i)
        good_step(ref_opt, ref_model, *data[i], api, seed=i)
    for a, b in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    assert_tree_equal(opt.base_optimizer.state_dict(), ref_opt.base_optimizer.state_dict(), "base")
    assert opt.step_count == ref_opt.step_count == WARM + 2
    assert opt.skipped_steps == 2 and ref_opt.skipped_steps == 0
    assert all_finite(model)


@pytest.mark.parametrize("case", [c for c in CASES if c.closure == "loss"], ids=lambda c: c.id)
def test_nothing_nonfinite_reaches_the_weights(case):
    """Random bad batches among good ones, both passes: the weights stay
    finite throughout and every bad step is counted."""
    data = batches(12, dtype=DTYPE, size=16)
    model, opt = build(case)
    rng = torch.Generator().manual_seed(0)
    expected_skips = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for i, (x, y) in enumerate(data):
            r = int(torch.randint(0, 4, (1,), generator=rng))
            bad_call = {0: None, 1: None, 2: 1, 3: 2}[r]
            mode = MODES[i % len(MODES)]
            closure, calls = closure_for(opt, model, x, y, bad_call, mode)
            opt.step(closure)
            expected_skips += bad_call is not None and calls[0] >= bad_call
            assert all_finite(model), f"step {i}"
    assert opt.skipped_steps == expected_skips > 0
    assert opt.step_count == len(data) - expected_skips


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_warning_is_per_optimizer(case):
    """Each optimizer warns once for itself: a second optimizer warns again."""
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    for _ in range(2):
        model, opt = build(case)
        with pytest.warns(RuntimeWarning, match="non-finite"):
            opt.step(closure_for(opt, model, x, y, 1, "nan_loss")[0])
        assert opt.skipped_steps == 1 and opt.step_count == 0


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_skip_control_plain_sgd_would_corrupt(case):
    """Control for the tests above: the same NaN fed to the base optimizer
    directly does corrupt the weights, so 'weights unchanged' is a real check."""
    model, opt = build(case)
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    closure, _ = closure_for(opt.base_optimizer, model, x, y, 1, "nan_loss")
    opt.base_optimizer.step(closure)
    assert not all_finite(model)


def test_grad_only_in_perturbed_pass_is_checked():
    """Conditional computation (an MoE expert routed to only at w + eps, a
    branch taken only there) gives a parameter a gradient in the perturbed
    pass alone; a NaN there must not reach the weights either."""
    for case in PER_METHOD:
        a = nn.Parameter(torch.ones(3, dtype=DTYPE))
        b = nn.Parameter(torch.ones(3, dtype=DTYPE))
        opt = flatminima.create(case.method, [a, b], torch.optim.SGD, **case.kwargs, lr=0.1)
        calls = [0]

        def closure():
            calls[0] += 1
            opt.zero_grad()
            loss = (a**2).sum()
            if calls[0] == 2:  # b takes part in the perturbed pass only, with a NaN gradient
                loss = loss + (b * math.nan).sum()
            loss.backward()
            return loss

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(closure)
        assert torch.isfinite(b).all(), f"{case.id}: {b.data}"
