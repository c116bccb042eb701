"""Each configuration calls its closure exactly as often as it promises
(methods_db.Case.closure_calls): two passes for SAM, ``1 + 1/k`` on average
for the periodic methods, one extra no-grad forward for data selection, no
extra forward where a special case promises none. The explicit API agrees:
``first_step()`` returns True exactly on the steps that take a second pass.

Driven by the database only.
"""

from __future__ import annotations

import pytest
import torch

import flatminima
import helpers
from methods_db import CASES, Case

STEPS = 7


def counting(closure, calls: list[int]):
    def counted(*args, **kwargs):
        calls[-1] += 1
        return closure(*args, **kwargs)

    return counted


def expected_calls(case: Case, steps: int) -> list[int] | None:
    if case.closure_calls is None:
        return None
    pattern = case.closure_calls
    return [pattern[i % len(pattern)] for i in range(steps)]


def build(case: Case):
    model = helpers.mlp(torch.float64, seed=0)
    opt = flatminima.create(
        case.method, helpers.two_groups(model, **case.second_group), torch.optim.SGD, lr=0.1, momentum=0.9, **case.kwargs
    )
    return model, opt


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_closure_calls_per_step(case: Case) -> None:
    model, opt = build(case)
    calls: list[int] = []
    perturbed: list[bool] = []
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64, size=16)):
        calls.append(0)
        before = opt.perturbed_steps
        torch.manual_seed(i)
        opt.step(counting(helpers.make_closure(opt, model, x, y, case.closure), calls))
        perturbed.append(opt.perturbed_steps > before)
    assert opt.step_count == STEPS
    want = expected_calls(case, STEPS)
    if want is not None:
        assert calls == want, f"{case.id}: closure calls per step {calls}, promised {want}"
    else:
        assert all(c in (1, 2) for c in calls), calls
    if helpers.pre_pass(case.method):  # one call per step, at w + eps once the momentum exists
        assert calls == [1] * STEPS and perturbed == [False] + [True] * (STEPS - 1), (calls, perturbed)
    else:  # one call on the steps without a perturbed pass, more on the others
        assert [c > 1 for c in calls] == perturbed, (calls, perturbed)
    assert any(perturbed), "no step perturbed"


@pytest.mark.parametrize("case", [c for c in CASES if c.closure_calls is not None], ids=lambda c: c.id)
def test_first_step_tells_the_explicit_api(case: Case) -> None:
    """first_step() returns True exactly on the steps whose closure form
    takes more than one pass, and the explicit loop that follows it gives
    the closure API's weights."""
    (m_a, o_a), (m_b, o_b) = build(case), build(case)
    want = expected_calls(case, STEPS)
    assert want is not None
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64, size=16)):
        torch.manual_seed(i)
        o_a.step(helpers.make_closure(o_a, m_a, x, y, case.closure))
        torch.nn.functional.cross_entropy(m_b(x), y).backward()
        perturbs = i > 0 if helpers.pre_pass(case.method) else want[i] > 1  # pre-pass: once a momentum exists
        assert o_b.first_step() == perturbs, f"{case.id}: step {i + 1}"
        o_b.cancel_step()
        o_b.zero_grad()
        torch.manual_seed(i)
        helpers.explicit_step(o_b, m_b, x, y, case.closure)
    assert o_a.counters == o_b.counters
    torch.testing.assert_close(helpers.params_of(m_a), helpers.params_of(m_b), rtol=1e-10, atol=1e-12)
