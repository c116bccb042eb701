"""``step(closure)`` reads the clean pass's finite verdict together with the perturbed pass's
(``flatminima._deferred``): one host read, so one CUDA synchronisation, per SAM step. On the
CPU the deferral is off (a read costs nothing there); these tests turn it on
(``_deferred.FORCE = True``; ``False`` is the early check) and check that it changes nothing but the number of reads: the same
weights and state step for step, the same skips, and running statistics untouched by the pass
that runs at a non-finite point.
"""

from __future__ import annotations

import math
import re
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import flatminima
from flatminima import _deferred
from helpers import assert_tree_equal, batches, clone_tree, closure_for, mlp, one_case_per_method, params_of, pre_pass
from methods_db import CASES

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
from benchmarks.syncs import count_host_reads  # noqa: E402

DTYPE = torch.float64
CLOSURE_CASES = [c for c in one_case_per_method(CASES) if c.closure == "loss"]


@pytest.fixture
def on_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_deferred, "FORCE", True)


def build(case, batchnorm: bool = False, with_model: bool = True):
    model = mlp(dtype=DTYPE, seed=0, batchnorm=batchnorm)
    opt = flatminima.create(
        case.method, model.parameters(), torch.optim.SGD, **case.kwargs,
        lr=0.05, momentum=0.9, weight_decay=1e-3, model=model if with_model else None,
    )
    return model, opt


def reads_by_function(where: dict[str, int]) -> dict[str, int]:
    return {re.sub(r":\d+", "", k): v for k, v in where.items()}


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda c: c.id)
def test_deferred_steps_equal_the_early_checked_ones(case, monkeypatch) -> None:
    """Every method, six steps with BatchNorm: the deferred run is bit-identical to the early
    checked one (weights, running statistics, the whole state dict)."""
    runs = []
    for defer in (False, True):
        monkeypatch.setattr(_deferred, "FORCE", defer)
        model, opt = build(case, batchnorm=True)
        for i, (x, y) in enumerate(batches(6, dtype=DTYPE, size=16)):
            torch.manual_seed(i)
            opt.step(closure_for(opt, model, x, y)[0])
        runs.append((model, opt))
    (m0, o0), (m1, o1) = runs
    assert_tree_equal(m1.state_dict(), m0.state_dict(), "model")
    assert_tree_equal(o1.state_dict(), o0.state_dict(), "optimizer")
    assert o1.skipped_steps == 0 and o1.step_count == 6


@pytest.mark.parametrize("name", ["sam", "asam", "wsam", "gsam"])
def test_a_deferred_sam_step_reads_the_device_once(name: str, on_host) -> None:
    case = next(c for c in CLOSURE_CASES if c.method == name)
    model, opt = build(case)
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    closure = closure_for(opt, model, x, y)[0]
    opt.step(closure)  # the base optimizer's state exists
    _, where = count_host_reads(lambda: opt.step(closure), calls=3)
    # the CPU also reads the radius factor to fold it into one add (_views.step_out); a device does not
    assert reads_by_function(where) == {"_tensorops.py is_finite": 3, "_views.py step_out": 3}, where


def test_without_model_or_on_the_cpu_or_under_a_scaler_the_check_stays_early(monkeypatch) -> None:
    """Two finite reads per step: without ``model=`` (a forward at non-finite weights would
    poison running statistics), on the CPU by default, and under a GradScaler."""
    case = next(c for c in CLOSURE_CASES if c.method == "sam")
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    for defer, with_model, scaled in [(True, False, False), (False, True, False), (True, True, True)]:
        monkeypatch.setattr(_deferred, "FORCE", defer)
        model, opt = build(case, with_model=with_model)
        scaler = torch.amp.GradScaler("cpu", init_scale=1.0) if scaled else None

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        opt.step(closure, scaler=scaler)
        _, where = count_host_reads(lambda: opt.step(closure, scaler=scaler))
        assert reads_by_function(where).get("_tensorops.py is_finite") == 2, (defer, with_model, scaled, where)


@pytest.mark.parametrize("where", ["clean", "perturbed"])
@pytest.mark.parametrize("mode", ["nan_loss", "inf_grad"])
@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda c: c.id)
def test_a_deferred_step_skips_as_the_early_one_does(case, mode, where, monkeypatch) -> None:
    """A non-finite gradient in either pass: the step is skipped whole and warned about, naming
    the pass; the weights and every state exactly as before it, and the model (running
    statistics included: the pass at a non-finite point leaves no trace) exactly as the early
    checked run's, at that step and the two after it."""
    data = batches(5, dtype=DTYPE, size=16)
    bad = {"clean": 1, "perturbed": 2}[where]
    runs = []
    for defer in (False, True):
        monkeypatch.setattr(_deferred, "FORCE", defer)
        model, opt = build(case, batchnorm=True)
        states, messages, calls = [], [], [0]
        for i, (x, y) in enumerate(data):
            closure, calls = closure_for(opt, model, x, y, bad if i == 2 else None, mode)
            if i == 2:
                w0, base0, own0 = params_of(model), clone_tree(opt.base_optimizer.state_dict()), clone_tree(opt.state_dict()["flatminima"])
            with warnings.catch_warnings(record=True) as record:
                warnings.simplefilter("always")
                torch.manual_seed(i)
                opt.step(closure)
            if i == 2:
                if calls[0] < bad:
                    pytest.skip("this configuration runs no perturbed pass on this step")
                messages = [str(w.message) for w in record if issubclass(w.category, RuntimeWarning)]
                for a, b in zip(w0, model.parameters()):
                    assert torch.equal(a, b)
                assert_tree_equal(opt.base_optimizer.state_dict(), base0, "base")
                own = clone_tree(opt.state_dict()["flatminima"])
                own.pop("counters"), own0.pop("counters")
                assert_tree_equal(own, own0, "own")
            states.append((clone_tree(model.state_dict()), clone_tree(opt.state_dict())))
        said = "perturbed" if pre_pass(case.method) else where
        assert len(messages) == 1 and f"non-finite gradient in the {said} pass" in messages[0], messages
        assert opt.skipped_steps == 1 and opt.step_count == 4
        runs.append(states)
    for i, ((m0, o0), (m1, o1)) in enumerate(zip(*runs)):
        assert_tree_equal(m1, m0, f"model after step {i}")
        assert_tree_equal(o1, o0, f"optimizer after step {i}")


@pytest.mark.parametrize("case", CLOSURE_CASES, ids=lambda c: c.id)
def test_a_deferred_clean_skip_runs_the_perturbed_pass(case, on_host) -> None:
    """The price of the single read: a non-finite clean gradient is found after the perturbed
    pass, which ran at a non-finite point (the early check would not have run it). Methods that
    decide from the gradient (AE-SAM) and a pre-pass method (Momentum-SAM) keep the early check."""
    model, opt = build(case)
    closure, calls = closure_for(opt, model, *batches(1, dtype=DTYPE, size=16)[0], bad_call=1)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    early = opt.pre_pass or opt.decides_from_gradient
    assert early == (case.method in ("ae_sam", "momentum_sam")), case.method
    assert calls[0] == (1 if early else 2) and opt.skipped_steps == 1


def test_an_overflowing_clean_norm_is_a_skip_when_deferred(monkeypatch) -> None:
    """float32 gradients of 2e20: finite, but their squared norm overflows. The early check
    takes it again in float64 and steps; deferred, the step is skipped (documented in
    ``_deferred``)."""
    case = next(c for c in CLOSURE_CASES if c.method == "sam")
    results = {}
    for defer in (False, True):
        monkeypatch.setattr(_deferred, "FORCE", defer)
        torch.manual_seed(0)
        model = nn.Linear(4, 1, bias=False)
        opt = flatminima.create(case.method, model.parameters(), torch.optim.SGD, lr=1e-22, model=model)
        x = torch.full((2, 4), 1e20)

        def closure():
            opt.zero_grad()
            out = model(x).sum()  # d out / d w = 2e20 per element: ||g||^2 = 1.6e41 > float32 max
            out.backward()
            return out

        w0 = model.weight.detach().clone()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            opt.step(closure)
        results[defer] = (opt.skipped_steps, torch.equal(model.weight, w0))
    assert results == {False: (0, False), True: (1, True)}


@pytest.mark.parametrize("case", [c for c in CASES if c.closure != "loss"], ids=lambda c: c.id)
def test_esam_per_sample_closures_defer_alike(case, monkeypatch) -> None:
    """ESAM's per-sample closure (the data selection's forward at ``w + eps`` included), a NaN clean
    pass at the third step: deferred and early checked runs end bit-identical, BatchNorm included;
    the deferred one ran the passes at the non-finite point and skipped the same step."""
    from helpers import make_closure

    runs = []
    for defer in (False, True):
        monkeypatch.setattr(_deferred, "FORCE", defer)
        model, opt = build(case, batchnorm=True)
        calls: list[int] = []
        for i, (x, y) in enumerate(batches(5, dtype=DTYPE, size=16)):
            per_sample = make_closure(opt, model, x, y, kind="per_sample")

            def closure(indices=None, i=i, per_sample=per_sample):
                calls.append(i)
                out = per_sample(indices)
                return out * math.nan if i == 2 and calls.count(2) == 1 else out

            torch.manual_seed(i)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                opt.step(closure)
        runs.append((clone_tree(model.state_dict()), clone_tree(opt.state_dict()), opt.skipped_steps, calls.count(2)))
    (m0, o0, s0, c0), (m1, o1, s1, c1) = runs
    assert_tree_equal(m1, m0, "model")
    assert_tree_equal(o1, o0, "optimizer")
    assert (s0, s1) == (1, 1) and c0 == 1 and c1 > 1
