"""The method's own state (per-parameter ``opt.state``) is what a resumed run
needs: dropping it from a checkpoint changes the continuation, keeping it
gives the uninterrupted run bit for bit. Complements test_resume.py by
showing that its bit-exact check really exercises the method state.

Driven by methods_db: every case whose method declares per-parameter state
(STATE_COPIES_BETWEEN_STEPS > 0).
"""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

import flatminima
from helpers import batches, make_closure, mlp, two_groups
from methods_db import CASES, STATE_COPIES_BETWEEN_STEPS

N = 3
DTYPE = torch.float64
STATEFUL = [c for c in CASES if STATE_COPIES_BETWEEN_STEPS.get(c.method, 0) > 0]


def roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def build(case, seed: int = 0):
    model = mlp(dtype=DTYPE, seed=seed)
    opt = flatminima.create(
        case.method, two_groups(model, **case.second_group), torch.optim.SGD, lr=0.05, momentum=0.9, **case.kwargs
    )
    return model, opt


def train(model, opt, data) -> None:
    for x, y in data:
        opt.step(make_closure(opt, model, x, y))


@pytest.mark.parametrize("case", STATEFUL, ids=lambda c: c.id)
def test_method_state_is_needed_to_resume(case):
    data = batches(2 * N, dtype=DTYPE, size=16)
    m_ref, o_ref = build(case)
    train(m_ref, o_ref, data)

    m_a, o_a = build(case)
    train(m_a, o_a, data[:N])
    sd = roundtrip(o_a.state_dict())
    assert sd["state"], "the method keeps no per-parameter state after N steps"
    n_params = sum(len(g["params"]) for g in o_a.param_groups)
    assert len(sd["state"]) == n_params
    assert all(isinstance(v, torch.Tensor) for s in sd["state"].values() for v in s.values())
    model_state = roundtrip(m_a.state_dict())

    # full checkpoint: bit for bit
    m_b, o_b = build(case, seed=7)
    m_b.load_state_dict(model_state)
    o_b.load_state_dict(sd)
    train(m_b, o_b, data[N:])
    assert all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_b.parameters()))

    # checkpoint without the method's per-parameter state (base state kept): differs
    m_c, o_c = build(case, seed=7)
    m_c.load_state_dict(model_state)
    o_c.load_state_dict({**sd, "state": {}})
    assert not o_c.state
    train(m_c, o_c, data[N:])
    assert not all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_c.parameters()))


def _other(value: Any) -> Any:
    """A different value of the same kind (what another constructor call might have given)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2
    if value is None:
        return 1.0
    raise AssertionError(f"no other value for {value!r}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_method_options_are_saved_and_restored(case):
    """Method-wide options (LookSAM's k, ESAM's gamma, clipping...) travel in
    the state dict and come back on load, as param-group hyperparameters do:
    an optimizer built with other values resumes the saved run's algorithm."""
    model, opt = build(case)
    names = type(opt).method_options
    assert {"max_grad_norm", "sync_perturbations"} <= set(names)
    for name in names:
        assert hasattr(opt, name), f"{case.id}: method option {name!r} is not an attribute"
    saved = roundtrip(opt.state_dict())
    assert saved["flatminima"]["options"] == {name: getattr(opt, name) for name in names}
    _, other = build(case)
    for name in names:
        setattr(other, name, _other(getattr(other, name)))
    other.load_state_dict(saved)
    assert {name: getattr(other, name) for name in names} == {name: getattr(opt, name) for name in names}
    # a state dict without options (an earlier version's) leaves them alone
    del saved["flatminima"]["options"]
    setattr(other, names[0], _other(getattr(opt, names[0])))
    other.load_state_dict(saved)
    assert getattr(other, names[0]) == _other(getattr(opt, names[0]))
