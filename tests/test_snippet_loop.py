"""The explicit API is safe however the loop around it is written.

The popular snippet runs its second backward whatever ``first_step()``
returned::

    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)

On a step without a perturbed pass (SAM every k, LookSAM's reuse steps,
AE-SAM's base steps, WSAM with gamma = 0, rho = 0, Momentum-SAM's first
step) that backward used to add ``g`` into the untouched ``.grad``: the base
optimizer got ``2 g``. first_step() now takes the gradients out of ``.grad``
and second_step() puts the clean ones back. For every configuration of
methods_db (and every special case of its equivalences), guarded or
unguarded, with the phases' ``zero_grad`` or the user's own, the explicit
loop gives the weights of ``step(closure)`` bit for bit (a model without
dropout: each pass at ``w`` computes the same ``g``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import flatminima
import helpers
from methods_db import CASES, EQUIVALENCES

STEPS = 6

#: (id, method, kwargs, closure form, second group's options, scheduler)
CONFIGS = [(c.id, c.method, c.kwargs, c.closure, c.second_group, c.scheduler) for c in CASES] + [
    (e.id, e.method, e.kwargs, flatminima.get_method(e.method).closure, {}, None) for e in EQUIVALENCES
]

Loss = Callable[[], torch.Tensor]


def guarded(opt: Any, loss: Loss) -> None:
    loss().backward()
    if opt.first_step(zero_grad=True):
        loss().backward()
    opt.second_step(zero_grad=True)


def guarded_by_hand(opt: Any, loss: Loss) -> None:
    opt.zero_grad()
    loss().backward()
    if opt.first_step():
        opt.zero_grad()
        loss().backward()
    opt.second_step()


def unguarded(opt: Any, loss: Loss) -> None:
    """The popular snippet, as the issue quotes it."""
    loss().backward()
    opt.first_step(zero_grad=True)
    loss().backward()
    opt.second_step(zero_grad=True)


def unguarded_no_zero_grad(opt: Any, loss: Loss) -> None:
    """No zero_grad between the passes at all (first_step() clears .grad itself)."""
    opt.zero_grad()
    loss().backward()
    opt.first_step()
    loss().backward()
    opt.second_step()


def own_order(opt: Any, loss: Loss) -> None:
    """A pre-pass method's documented order (docs/methods/momentum_sam.md)."""
    opt.first_step(zero_grad=True)
    loss().backward()
    opt.second_step(zero_grad=True)


LOOPS = {f.__name__: f for f in (guarded, guarded_by_hand, unguarded, unguarded_no_zero_grad, own_order)}


def per_sample_loop(opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, guard: bool) -> None:
    """ESAM's explicit per-sample protocol (docs/methods/esam.md), its
    selected backward guarded by first_step() or always run."""
    with opt.clean_pass():
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        if losses.requires_grad:
            losses.mean().backward()
    if opt.first_step(zero_grad=True) or not guard:
        with torch.no_grad():
            after = nn.functional.cross_entropy(model(x), y, reduction="none")
        idx = opt.select_samples(losses.detach(), after)
        nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none").mean().backward()
    opt.second_step(zero_grad=True)


def run(config: tuple[Any, ...], loop: str | None) -> tuple[list[torch.Tensor], dict[str, int]]:
    """STEPS steps of ``config`` through ``step(closure)`` (``loop=None``) or an explicit loop."""
    _, method, kwargs, form, second, scheduler = config
    model = helpers.mlp(torch.float64, seed=0)
    opt = flatminima.create(method, helpers.two_groups(model, **second), torch.optim.SGD, lr=0.1, momentum=0.9, **kwargs)
    schedulers = [scheduler(opt)] if scheduler else []
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64, size=16)):
        torch.manual_seed(i)
        if loop is None:
            opt.step(helpers.make_closure(opt, model, x, y, form))
        elif form == "per_sample":
            per_sample_loop(opt, model, x, y, guard=loop.startswith("guarded"))
        else:
            LOOPS[loop](opt, lambda: nn.functional.cross_entropy(model(x), y))
        for s in schedulers:
            s.step()
    return helpers.params_of(model), dict(opt.counters)


def loops_of(config: tuple[Any, ...]) -> list[str]:
    if config[3] == "per_sample":
        return ["guarded", "unguarded"]
    own = ["own_order"] if helpers.pre_pass(flatminima.get_method(config[1]).cls) else []
    return ["guarded", "guarded_by_hand", "unguarded", "unguarded_no_zero_grad", *own]


#: methods whose steps may skip the perturbed pass (at some settings)
WITHOUT_EPS = {"sam_every_k", "looksam", "ae_sam", "wsam", "momentum_sam"}
seen_without_eps: set[str] = set()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c[0])
def test_explicit_loops_equal_step_closure(config: tuple[Any, ...]) -> None:
    want_w, want_counters = run(config, None)
    if want_counters["perturbed_steps"] < want_counters["steps"]:
        seen_without_eps.add(config[1])
    for loop in loops_of(config):
        got_w, got_counters = run(config, loop)
        assert got_counters == want_counters, f"{config[0]}/{loop}"
        helpers.assert_tree_equal(got_w, want_w, loop)


def test_the_comparison_can_fail() -> None:
    """Every method whose steps can skip the perturbed pass has such steps in
    some configuration above (where the old code's 2 g shows), and every
    registered method is there."""
    assert {c[1] for c in CONFIGS} == set(flatminima.list_methods())
    if len(seen_without_eps) < len(WITHOUT_EPS):  # run alone: take the runs here
        seen_without_eps.update(c[1] for c in CONFIGS if c[1] in WITHOUT_EPS and run(c, None)[1]["perturbed_steps"] < STEPS)
    assert WITHOUT_EPS <= seen_without_eps, seen_without_eps


def test_grads_are_set_aside_and_put_back() -> None:
    """On a step without eps, .grad is empty between the phases, and the
    clean gradient tensors (not copies) are back after second_step()."""
    model = helpers.mlp()
    opt = flatminima.create("sam_every_k", model.parameters(), torch.optim.SGD, lr=0.1, k=2)
    data = helpers.batches(2)
    for x, y in data:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        grads = [p.grad for p in model.parameters()]
        perturbed = opt.first_step()
        assert all(p.grad is None for p in model.parameters())
        if perturbed:
            nn.functional.cross_entropy(model(x), y).backward()
        else:
            opt.cancel_step()  # abandoning the step puts them back too
            assert all(p.grad is g for p, g in zip(model.parameters(), grads))
            assert not opt.first_step()
            nn.functional.cross_entropy(model(x), y).mul(3.0).backward()  # dropped: the clean g is used
        opt.second_step()
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))


@pytest.mark.parametrize("method", [m for m in flatminima.list_methods() if m != "momentum_sam"])
def test_first_step_without_a_backward_is_refused(method: str) -> None:
    """No gradient anywhere: the clean backward is missing. Nothing is
    counted and the next step runs normally."""
    model = helpers.mlp()
    opt = flatminima.create(method, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    w0 = helpers.params_of(model)
    with pytest.raises(ValueError, match=r"first_step\(\) found no gradient in \.grad: the clean backward is missing"):
        opt.first_step()
    helpers.assert_tree_equal(helpers.params_of(model), w0)
    assert opt.counters == {"steps": 0, "perturbed_steps": 0, "skipped_steps": 0}
    x, y = helpers.batches(1)[0]
    opt.step(helpers.make_closure(opt, model, x, y, flatminima.get_method(method).closure))
    assert opt.step_count == 1


def test_esam_clean_pass_without_gradient_under_its_mask_is_allowed() -> None:
    """ESAM's mask may hide every tensor the loss uses (test_esam's
    test_mask_hiding_every_used_tensor): the explicit clean pass then has no
    gradient and the step has eps = 0 by design, not an error. The same
    model with nothing masked (skip_inactive_grads=False) is refused."""
    from test_esam import SEED_UNUSED_ONLY

    for skip, refused in ((True, False), (False, True)):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 3, bias=False))
        model.unused = nn.Parameter(torch.ones(2))
        x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        opt = flatminima.ESAM(model.parameters(), torch.optim.SGD, seed=SEED_UNUSED_ONLY, gamma=1.0, lr=0.1,
                              skip_inactive_grads=skip)
        w0 = model[0].weight.detach().clone()
        with opt.clean_pass():
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            assert losses.requires_grad is not skip
        if refused:
            with pytest.raises(ValueError, match="the clean backward is missing"):
                opt.first_step()
            continue
        assert opt.first_step(zero_grad=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        g = model[0].weight.grad.clone()
        opt.second_step(zero_grad=True)
        torch.testing.assert_close(model[0].weight.detach(), w0 - 0.1 * g)
