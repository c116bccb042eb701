"""Momentum-SAM's own promises (its formula is checked against the reference
with every other method, in test_reference / test_composition): the order of
calls of the explicit API, what it does before a momentum exists, which base
optimizers it reads, and its radius."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import flatminima
import helpers


def _explicit(opt: flatminima.SharpnessAware, model: nn.Module, steps: int = 4) -> torch.Tensor:
    """The documented order: first_step(zero_grad=True), the only backward, second_step()."""
    for x, y in helpers.batches(steps, torch.float64):
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _plain(make: type, **kw: float) -> torch.Tensor:
    model = helpers.mlp(torch.float64)
    opt = make(model.parameters(), **kw)
    for x, y in helpers.batches(4, torch.float64):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_explicit_order_clears_stale_gradients_on_steps_without_eps() -> None:
    """first_step(zero_grad=True) before the backward clears .grad on every
    step, perturbed or not: without a momentum (SGD momentum=0) it is SGD bit
    for bit, and every-k with rho=0 is SGD with momentum bit for bit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        model = helpers.mlp(torch.float64)
        got = _explicit(flatminima.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.0), model)
    assert torch.equal(got, _plain(torch.optim.SGD, lr=0.1))
    model = helpers.mlp(torch.float64)
    opt = flatminima.compose(model.parameters(), torch.optim.SGD, ascent="momentum", schedule="every_k", k=2,
                             rho=0.0, lr=0.1, momentum=0.9)
    assert torch.equal(_explicit(opt, model), _plain(torch.optim.SGD, lr=0.1, momentum=0.9))


def test_momentum_zero_warns_once_and_other_bases_are_refused() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.warns(RuntimeWarning, match="momentum=0: SGD keeps no momentum buffer") as record:
        flatminima.MomentumSAM(params, torch.optim.SGD, lr=0.1)
    assert len(record) == 1
    with pytest.raises(ValueError, match="cannot read it from Adagrad; use one of SGD, Adam, AdamW"):
        flatminima.MomentumSAM(params, torch.optim.Adagrad, lr=0.1)

    class MySGD(torch.optim.SGD):
        pass

    flatminima.MomentumSAM(params, MySGD, lr=0.1, momentum=0.9)  # a subclass keeps the buffer where SGD does


def test_first_step_perturbs_along_minus_momentum_with_radius_rho() -> None:
    """No eps before a momentum exists; then eps = -rho m / ||m|| over every group."""
    model = helpers.mlp(torch.float64)
    opt = flatminima.MomentumSAM(helpers.two_groups(model), torch.optim.Adam, rho=0.3, lr=1e-2)
    data = helpers.batches(2, torch.float64)
    w0 = [p.detach().clone() for p in model.parameters()]
    assert not opt.first_step(zero_grad=True)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
    opt.second_step()
    w1 = [p.detach().clone() for p in model.parameters()]
    m = [opt.base_optimizer.state[p]["exp_avg"].clone() for p in model.parameters()]
    assert opt.first_step(zero_grad=True)
    eps = [p.detach() - w for p, w in zip(model.parameters(), w1)]
    norm = torch.sqrt(sum((e**2).sum() for e in eps))
    m_norm = torch.sqrt(sum((t**2).sum() for t in m))
    assert abs(float(norm) - 0.3 * float(m_norm / (m_norm + 1e-12))) < 1e-12  # ||eps|| = rho (up to eps0)
    for e, mi in zip(eps, m):
        torch.testing.assert_close(e, -0.3 * mi / (m_norm + 1e-12), rtol=1e-10, atol=1e-14)
    assert all(p.grad is None for p in model.parameters())  # the stale gradients are gone
    with pytest.raises(ValueError, match="the perturbed pass left no gradient"):
        opt.second_step()  # no backward at w + eps
    assert all(torch.equal(a, b) for a, b in zip(w1, model.parameters()))  # w restored


def test_no_backward_after_an_unperturbed_first_step_is_refused() -> None:
    model = helpers.mlp(torch.float64)
    opt = flatminima.MomentumSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert not opt.first_step(zero_grad=True)  # no momentum yet
    with pytest.raises(ValueError, match="no gradient in .grad; call first_step\\(\\) before the backward"):
        opt.second_step()
    assert opt.step_count == 0
