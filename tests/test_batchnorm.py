"""Running statistics come from the clean pass only (docs/algorithms.md, rules shared by every method):
after a step, every running buffer equals what one clean training-mode
forward from the same start gives, for BatchNorm of every flavour and for
custom modules with running buffers."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import flatminima
from helpers import make_closure, one_case_per_method, pre_pass
from methods_db import CASES

PER_METHOD = one_case_per_method(CASES)

DTYPE = torch.float64


class RunningMax(nn.Module):
    """Keeps the running maximum of each feature, updated in place."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_max", torch.full((n,), -math.inf, dtype=DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.running_max.copy_(torch.maximum(self.running_max, x.amax(0)))
        return x


class RebindingMean(nn.Module):
    """Re-binds its buffer to a new tensor each forward instead of updating it in place."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("running_x", torch.zeros(n, dtype=DTYPE))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.running_x = 0.9 * self.running_x + 0.1 * x.detach().mean(0)
            self.num_batches_tracked = self.num_batches_tracked + 1
        return x


class Flat(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def mlp_with(norm: nn.Module) -> nn.Module:
    return nn.Sequential(nn.Linear(6, 16), norm, nn.Tanh(), nn.Linear(16, 3))


MODELS = {
    "bn1d": lambda: mlp_with(nn.BatchNorm1d(16)),
    "bn1d-cumulative": lambda: mlp_with(nn.BatchNorm1d(16, momentum=None)),
    "bn2d-conv": lambda: nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), Flat(), nn.Linear(4 * 5 * 5, 3)
    ),
    "running-max": lambda: mlp_with(RunningMax(16)),
    "rebinding-buffer": lambda: mlp_with(RebindingMean(16)),
}


def make(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model = MODELS[name]().to(DTYPE)
    g = torch.Generator().manual_seed(seed + 1)
    shape = (8, 2, 5, 5) if name.startswith("bn2d") else (16, 6)
    x = torch.randn(*shape, generator=g, dtype=DTYPE)
    y = torch.randint(0, 3, (shape[0],), generator=g)
    return model, x, y


def buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_buffers()}


def clean_only(model: nn.Module, x, y) -> dict[str, torch.Tensor]:
    """Buffers after one clean training-mode forward/backward from the same start."""
    ref = copy.deepcopy(model)
    ref.train()
    nn.functional.cross_entropy(ref(x), y).backward()
    return buffers(ref)


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def opt_for(case, net, **extra):
    return flatminima.create(case.method, net.parameters(), torch.optim.SGD, **case.kwargs, lr=0.1, **extra)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("name", list(MODELS))
def test_closure_with_model_keeps_clean_stats(case, name):
    model, x, y = make(name)
    start = buffers(model)
    expected = clean_only(model, x, y)
    assert not same(expected, start), "the clean pass should move the stats"
    opt = opt_for(case, model, model=model)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(make_closure(opt, model, x, y))
    assert same(buffers(model), expected)
    assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters())), "the step should train"
    # registered buffers are still the module's buffers (state_dict sees the restored values)
    assert same({k: v for k, v in model.state_dict().items() if k in expected}, expected)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("name", list(MODELS))
def test_without_model_the_perturbed_pass_moves_stats(case, name):
    """Negative control: no model= and no context manager, and the perturbed
    pass does change the running statistics, so the test above can fail."""
    model, x, y = make(name)
    expected = clean_only(model, x, y)
    opt = opt_for(case, model)
    opt.step(make_closure(opt, model, x, y))
    if opt.perturbed_steps == 0:
        pytest.skip("no perturbed pass on this step")
    assert not same(buffers(model), expected)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("name", list(MODELS))
def test_explicit_api_with_context_manager(case, name):
    model, x, y = make(name)
    expected = clean_only(model, x, y)
    opt = opt_for(case, model)
    explicit_bn_step(opt, model, x, y)
    assert same(buffers(model), expected)


def explicit_bn_step(opt, model, x, y):
    """The explicit API with the context manager around the perturbed pass; a
    pre-pass method's order is first_step, its only backward, second_step."""
    if pre_pass(type(opt)):
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()  # its only pass: its statistics are kept
        opt.second_step(zero_grad=True)
        return
    nn.functional.cross_entropy(model(x), y).backward()
    if opt.first_step(zero_grad=True):
        with flatminima.preserve_running_stats(model):
            nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("name", ["bn1d", "bn1d-cumulative", "rebinding-buffer"])
def test_several_steps_count_clean_batches_only(case, name):
    """Over k steps, num_batches_tracked counts k batches (not 2k), and the
    closure API with model= matches the explicit API with the context manager
    bit for bit, weights and buffers."""
    k = 3
    m1, x, y = make(name)
    m2 = copy.deepcopy(m1)
    o1 = opt_for(case, m1, model=m1)
    o2 = opt_for(case, m2)
    for _ in range(k):
        o1.step(make_closure(o1, m1, x, y))
        explicit_bn_step(o2, m2, x, y)
    counts = [int(v) for name_, v in m1.named_buffers() if name_.endswith("num_batches_tracked")]
    assert counts == [k]
    assert same(buffers(m1), buffers(m2))
    for a, b in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(a, b)


def test_rebinding_buffer_is_registered_and_restored():
    model, x, y = make("rebinding-buffer")
    module = model[1]
    original = module.running_x
    with flatminima.preserve_running_stats(model):
        model(x)
        assert module.running_x is not original
        assert not torch.equal(module.running_x, torch.zeros(16, dtype=DTYPE))
    assert torch.equal(module.running_x, torch.zeros(16, dtype=DTYPE))
    assert int(module.num_batches_tracked) == 0
    assert module._buffers["running_x"] is original  # the module's registered buffer, not a stray attribute
    assert torch.equal(model.state_dict()["1.running_x"], torch.zeros(16, dtype=DTYPE))


def test_context_manager_restores_on_exception():
    model, x, y = make("bn1d")
    before = buffers(model)
    with pytest.raises(RuntimeError, match="boom"):
        with flatminima.preserve_running_stats(model):
            model(x)
            raise RuntimeError("boom")
    assert same(buffers(model), before)


def test_all_buffers_filter_covers_other_names():
    """A statistic under a name the default rule does not know is kept by
    ``all_buffers`` (and, as documented, not by the default rule)."""

    class Ema(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("ema", torch.zeros(16, dtype=DTYPE))

        def forward(self, x):
            self.ema.mul_(0.5).add_(x.detach().mean(0), alpha=0.5)
            return x

    torch.manual_seed(0)
    model = mlp_with(Ema()).to(DTYPE)
    x = torch.randn(8, 6, dtype=DTYPE)
    with flatminima.preserve_running_stats(model, buffers=flatminima.all_buffers):
        model(x)
    assert torch.equal(model[1].ema, torch.zeros(16, dtype=DTYPE))
    with flatminima.preserve_running_stats(model):
        model(x)
    assert not torch.equal(model[1].ema, torch.zeros(16, dtype=DTYPE))


def test_eval_mode_model_is_untouched():
    """In eval mode nothing moves; the step still trains."""
    model, x, y = make("bn1d")
    model.eval()
    before = buffers(model)
    opt = opt_for(CASES[0], model, model=model)
    opt.step(make_closure(opt, model, x, y))
    assert same(buffers(model), before)
