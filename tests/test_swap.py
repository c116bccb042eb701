"""The fast path's perturbation re-points each parameter at ``w + eps``
computed in its gradient's buffer, and back (``_base._perturb``). What it
must never do: leave a parameter on another storage after the step, write
into storage someone else owns (a gradient that is a view, as DDP's
``gradient_as_bucket_view`` gives), or differ from the copy path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import flatminima
import helpers
from methods_db import CASES, Case
from test_reference import build_pair


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_parameters_keep_their_storage(case: Case) -> None:
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    ptrs = [p.data_ptr() for p in model.parameters()]
    seen = []

    def watch(*args: object) -> torch.Tensor:
        seen.append([p.data_ptr() for p in model.parameters()])
        return inner(*args)

    for x, y in helpers.batches(3, torch.float64):
        inner = helpers.make_closure(opt, model, x, y, case.closure)
        opt.step(watch)
        assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert opt.perturbed_steps > 0
    moved = [s for s in seen if s != ptrs]
    assert len(moved) == opt.perturbed_steps or case.closure == "per_sample"  # swapped exactly in the perturbed passes


def _grads_as_views_of_one_buffer(model: nn.Module) -> torch.Tensor:
    """Gradients that are views of one flat buffer (DDP's gradient_as_bucket_view)."""
    params = list(model.parameters())
    flat = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype)
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    return flat


@pytest.mark.parametrize("case", [c for c in CASES if c.closure == "loss"], ids=lambda c: c.id)
def test_gradient_views_take_the_copy_path(case: Case) -> None:
    """With gradients that are views of a shared buffer the step copies
    instead (the buffer is not the optimizer's to re-point weights at), and
    gives the same weights as plain gradients do."""
    if helpers.pre_pass(case.method):
        pytest.skip("a pre-pass method builds w + eps in buffers of its own, never in the gradients")
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    for x, y in helpers.batches(3, torch.float64):
        _grads_as_views_of_one_buffer(model)
        nn.functional.cross_entropy(model(x), y).backward()  # accumulates into the views
        ptrs = [p.data_ptr() for p in model.parameters()]
        if opt.first_step():
            assert [p.data_ptr() for p in model.parameters()] == ptrs, "re-pointed at a view's storage"
            for p in model.parameters():
                p.grad.zero_()  # the views stay bound, as DDP's do
            nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step()
        helpers.explicit_step(opt2, model2, x, y)
    helpers.assert_tree_equal(helpers.params_of(model), helpers.params_of(model2))


def test_zero_grad_without_set_to_none_keeps_the_perturbed_weights() -> None:
    """After the swap the parameter's data is the old gradient buffer; its
    .grad is unset, so zero_grad(set_to_none=False) cannot zero the weights."""
    model = helpers.mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, foreach=True)
    x, y = helpers.batches(1)[0]
    nn.functional.cross_entropy(model(x), y).backward()
    assert opt.first_step()
    perturbed = helpers.params_of(model)
    opt.zero_grad(set_to_none=False)
    helpers.assert_tree_equal(helpers.params_of(model), perturbed)
    assert all(p.grad is None for p in model.parameters())
    nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step()


def test_parameters_sharing_one_buffer_take_the_copy_path() -> None:
    """Parameters whose ``.data`` are slices of one buffer without being
    views (as ``nn.LSTM.flatten_parameters()`` makes them on CUDA) keep
    their storage during the perturbed pass: the buffer stays whole."""
    model = helpers.mlp()
    params = list(model.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    offset = 0
    for p in params:
        p.data = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()
    model2 = helpers.mlp()
    opt = flatminima.SAM(model.parameters(), torch.optim.SGD, lr=0.1, foreach=True)
    opt2 = flatminima.SAM(model2.parameters(), torch.optim.SGD, lr=0.1, foreach=True)
    for x, y in helpers.batches(2):
        nn.functional.cross_entropy(model(x), y).backward()
        assert opt.first_step(zero_grad=True)
        assert all(p.untyped_storage().data_ptr() == flat.data_ptr() for p in model.parameters())
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        helpers.explicit_step(opt2, model2, x, y)
    helpers.assert_tree_equal(helpers.params_of(model), helpers.params_of(model2))
    torch.testing.assert_close(flat, torch.cat([p.detach().reshape(-1) for p in model.parameters()]), rtol=0, atol=0)
