"""ESAM's own machinery (the formulas are checked against tests/reference.py
through methods_db): the tensor mask and the gradients it saves, the two
closure forms, the data selection, and what a failure in one of ESAM's
extra passes leaves behind."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

import flatminima
from flatminima.esam import step_seed
from helpers import assert_tree_equal, batches, clone_tree, make_closure, mlp, params_of
from methods_db import ESAM_SEED

DTYPE = torch.float64
F = nn.functional
SEED_UNUSED_ONLY = 0  # with 2 tensors at beta = 0.5, step 0 perturbs the first only


def esam(params, **kwargs):
    kwargs = {"rho": 0.1, "beta": 0.5, "gamma": 0.5, "seed": 0, "lr": 0.1, **kwargs}
    return flatminima.ESAM(params, torch.optim.SGD, **kwargs)


def uniforms(seed: int, step: int, n: int) -> list[float]:
    gen = torch.Generator().manual_seed(step_seed(seed, step))
    return torch.rand(n, generator=gen, dtype=torch.float64).tolist()


def test_db_seed_perturbs_the_first_tensors():
    """methods_db.ESAM_SEED promises that the first two tensors are perturbed
    in the first four steps at beta = 0.5 (protocol tests rely on it), and
    that some tensors are masked (so those tests exercise the mask)."""
    draws = [uniforms(ESAM_SEED, t, 6) for t in range(4)]
    assert all(u[0] < 0.5 and u[1] < 0.5 for u in draws)
    assert any(x >= 0.5 for u in draws for x in u)


def test_step_seed_spreads():
    seeds = {step_seed(0, t) for t in range(1000)} | {step_seed(s, 0) for s in range(1, 1000)}
    assert len(seeds) == 1999 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------- the mask


class Spy:
    """A closure (either form) that records requires_grad of every parameter
    at each call."""

    def __init__(self, opt, model, x, y, kind):
        self.inner = make_closure(opt, model, x, y, kind)
        self.model = model
        self.flags: list[list[bool]] = []

    def __call__(self, *args):
        self.flags.append([p.requires_grad for p in self.model.parameters()])
        return self.inner(*args)


@pytest.mark.parametrize("kind", ["loss", "per_sample"])
def test_masked_tensors_compute_no_clean_gradient(kind):
    model = mlp(DTYPE, seed=0)
    opt = esam(model.parameters(), seed=ESAM_SEED, gamma=1.0 if kind == "loss" else 0.5)
    for i, (x, y) in enumerate(batches(4, DTYPE, size=16)):
        mask = opt.tensor_mask()
        assert mask == [u < 0.5 for u in uniforms(ESAM_SEED, i, 6)]
        spy = Spy(opt, model, x, y, kind)
        opt.step(spy)
        assert spy.flags[0] == mask, f"step {i}: the clean pass must see exactly the perturbed tensors"
        assert all(all(f) for f in spy.flags[1:]), "every later pass computes every gradient"
        assert all(p.requires_grad for p in model.parameters())
    assert opt.method_state["step"] == 4


def test_masked_tensors_are_not_perturbed_but_are_updated():
    model = mlp(DTYPE, seed=0)
    opt = esam(model.parameters(), seed=ESAM_SEED, gamma=1.0)
    x, y = batches(1, DTYPE, size=16)[0]
    mask = opt.tensor_mask()
    assert not all(mask) and any(mask)
    w0 = params_of(model)
    with opt.clean_pass():
        F.cross_entropy(model(x), y).backward()
    assert [p.grad is not None for p in model.parameters()] == mask
    assert opt.first_step()
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    assert [bool(e.abs().sum() > 0) for e in eps] == mask
    # radius rho / beta over the perturbed tensors
    norm = math.sqrt(sum(float(e.pow(2).sum()) for e in eps))
    assert norm == pytest.approx(0.1 / 0.5, rel=1e-12)
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert all(not torch.equal(p, w) for p, w in zip(model.parameters(), w0)), "every tensor is updated with g_p"


def test_mask_without_clean_pass_context_gives_the_same_step():
    """Explicit API without clean_pass(): the masked tensors' clean gradients
    are computed and ignored; the step is the same (to rounding)."""
    runs = []
    for use_context in (True, False):
        model = mlp(DTYPE, seed=0)
        opt = esam(model.parameters(), seed=ESAM_SEED, gamma=1.0)
        for x, y in batches(3, DTYPE, size=16):
            if use_context:
                with opt.clean_pass():
                    F.cross_entropy(model(x), y).backward()
            else:
                F.cross_entropy(model(x), y).backward()
            if opt.first_step(zero_grad=True):
                F.cross_entropy(model(x), y).backward()
            opt.second_step(zero_grad=True)
        runs.append(params_of(model))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-14)


def test_same_seed_same_masks_and_masks_vary():
    a = esam(mlp(DTYPE).parameters(), seed=123)
    b = esam(mlp(DTYPE).parameters(), seed=123)
    masks = []
    for step in range(8):
        a.method_state["step"] = b.method_state["step"] = step
        assert a.tensor_mask() == b.tensor_mask()
        masks.append(tuple(a.tensor_mask()))
    assert len(set(masks)) > 1
    assert esam(mlp(DTYPE).parameters(), beta=1.0).tensor_mask() is None


def test_seed_default_and_state_dict():
    params = mlp(DTYPE).parameters()  # (mlp() seeds torch itself)
    torch.manual_seed(77)
    opt = esam(params, seed=None)
    assert opt.method_state == {"step": 0, "seed": 77}
    model = mlp(DTYPE)
    trained = esam(model.parameters(), seed=5)
    x, y = batches(1, DTYPE, size=16)[0]
    trained.step(make_closure(trained, model, x, y, "per_sample"))
    other = esam(mlp(DTYPE).parameters(), seed=9)
    other.load_state_dict(trained.state_dict())
    assert other.method_state == {"step": 1, "seed": 5}
    assert other.tensor_mask() == trained.tensor_mask()


@pytest.mark.parametrize("kind", ["loss", "per_sample"])
def test_mask_hiding_every_used_tensor(kind):
    """When the draw perturbs only tensors the loss does not depend on, the
    step has eps = 0: it is the base optimizer's step on the gradient at w.
    With PyTorch's closure form the clean pass is run again without the
    mask; with model= its running statistics count one clean batch."""
    seed = SEED_UNUSED_ONLY  # step 0: tensor 0 (unused) perturbed, tensor 1 (used) masked
    assert [u < 0.5 for u in uniforms(seed, 0, 2)] == [True, False]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.BatchNorm1d(3, affine=False)).to(DTYPE)
    model.unused = nn.Parameter(torch.ones(2, dtype=DTYPE))
    assert list(model.parameters())[0] is model.unused
    x, y = torch.randn(8, 4, dtype=DTYPE), torch.randint(0, 3, (8,))
    opt = esam(model.parameters(), seed=seed, gamma=1.0, model=model)
    w0 = model[0].weight.detach().clone()
    ref = copy.deepcopy(model)
    F.cross_entropy(ref(x), y).backward()
    expected_w = w0 - 0.1 * ref[0].weight.grad
    opt.step(make_closure(opt, model, x, y, kind))
    torch.testing.assert_close(model[0].weight.detach(), expected_w, rtol=1e-12, atol=1e-14)
    assert torch.equal(model.unused, torch.ones(2, dtype=DTYPE))
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, ref[1].running_mean, rtol=0, atol=0)
    assert all(p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- the closure forms


def test_pytorch_closure_needs_gamma_one():
    model = mlp(DTYPE)
    opt = esam(model.parameters(), gamma=0.5)
    x, y = batches(1, DTYPE, size=16)[0]
    w0 = params_of(model)
    with pytest.raises(ValueError, match="per-sample"):
        opt.step(make_closure(opt, model, x, y))
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt.step_count == 0 and all(p.requires_grad for p in model.parameters())
    opt.step(make_closure(opt, model, x, y, "per_sample"))  # usable afterwards
    assert opt.step_count == 1


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (lambda losses: losses.reshape(4, -1), "shape"),
        (lambda losses: losses.detach(), "do not require grad"),
    ],
    ids=["2-d", "detached"],
)
def test_bad_per_sample_closures(bad, match):
    model = mlp(DTYPE)
    opt = esam(model.parameters(), beta=1.0)
    x, y = batches(1, DTYPE, size=16)[0]
    inner = make_closure(opt, model, x, y, "per_sample")
    with pytest.raises(ValueError, match=match):
        opt.step(lambda indices=None: bad(inner(indices)))
    assert opt.step_count == 0 and opt._pending is None


def test_step_returns_the_mean_clean_loss_and_calls():
    model = mlp(DTYPE)
    opt = esam(model.parameters(), gamma=0.25)
    x, y = batches(1, DTYPE, size=16)[0]
    expected = F.cross_entropy(model(x), y, reduction="none").mean()
    seen = []

    def closure(indices=None):
        seen.append((torch.is_grad_enabled(), None if indices is None else indices.tolist()))
        return make_closure(opt, model, x, y, "per_sample")(indices)

    loss = opt.step(closure)
    assert torch.equal(loss, expected.detach())
    assert [s[0] for s in seen] == [True, False, True]  # clean, ranking without grad, perturbed
    assert seen[0][1] is None and seen[1][1] is None
    assert len(seen[2][1]) == 4 and seen[2][1] == sorted(seen[2][1])


def test_select_samples():
    opt = esam([nn.Parameter(torch.zeros(1))], gamma=0.3)
    clean = torch.zeros(10, dtype=DTYPE)
    after = torch.tensor([0.5, 3.0, -1.0, 2.0, 0.1, 9.0, 0.0, 1.0, 2.5, 0.2], dtype=DTYPE)
    assert opt.kept_samples(10) == 3
    assert opt.select_samples(clean, after).tolist() == [1, 5, 8]
    after[0] = math.nan  # a sample whose loss is NaN at w + eps is kept (its gradient then skips the step)
    assert opt.select_samples(clean, after).tolist() == [0, 1, 5]
    assert opt.kept_samples(2) == 1 and opt.select_samples(clean[:2], after[:2]).tolist() == [0]
    whole = esam([nn.Parameter(torch.zeros(1))], gamma=1.0)
    assert whole.select_samples(clean, after).tolist() == list(range(10))
    with pytest.raises(ValueError, match="1-D"):
        opt.select_samples(clean, after[:5])


# ---------------------------------------------------------------- failures in ESAM's passes


def per_sample_closure(model, x, y, bad_call=None, mode="nan", calls=None):
    calls = calls if calls is not None else [0]

    def closure(indices=None):
        calls[0] += 1
        xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        if calls[0] == bad_call:
            if mode == "raise":
                raise RuntimeError("boom in pass")
            losses = losses * torch.tensor(math.nan, dtype=losses.dtype)
        return losses

    return closure, calls


def state(opt):
    sd = clone_tree(opt.state_dict())
    sd["flatminima"].pop("counters")
    return sd


@pytest.mark.parametrize("bad_call", [1, 3, "2+3"], ids=["clean", "perturbed", "ranking-and-perturbed"])
def test_nonfinite_per_sample_pass_skips_the_step(bad_call):
    data = batches(5, DTYPE, size=16)
    model = mlp(DTYPE, seed=0)
    opt = esam(model.parameters(), momentum=0.9)
    for x, y in data[:2]:
        opt.step(per_sample_closure(model, x, y)[0])
    w0, own0, base0 = params_of(model), state(opt), clone_tree(opt.base_optimizer.state_dict())
    x, y = data[2]
    calls = [0]
    if bad_call == "2+3":  # a real NaN at w + eps shows in both passes there
        def closure(indices=None):
            calls[0] += 1
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            losses = F.cross_entropy(model(xb), yb, reduction="none")
            return losses * torch.tensor(math.nan, dtype=DTYPE) if calls[0] >= 2 else losses
    else:
        closure, calls = per_sample_closure(model, x, y, bad_call)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        opt.step(closure)
    assert any("non-finite" in str(w.message) for w in record)
    assert opt.skipped_steps == 1 and opt.step_count == 2
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert_tree_equal(state(opt), own0)
    assert_tree_equal(opt.base_optimizer.state_dict(), base0)
    # then as if the bad batch had never been seen
    ref_model = mlp(DTYPE, seed=0)
    ref = esam(ref_model.parameters(), momentum=0.9)
    for x, y in data[:2]:
        ref.step(per_sample_closure(ref_model, x, y)[0])
    for x, y in data[3:]:
        opt.step(per_sample_closure(model, x, y)[0])
        ref.step(per_sample_closure(ref_model, x, y)[0])
    assert all(torch.equal(a, b) for a, b in zip(ref_model.parameters(), model.parameters()))


@pytest.mark.parametrize("bad_call", [2, 3], ids=["ranking", "perturbed"])
def test_exception_in_a_pass_at_w_plus_eps(bad_call):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = batches(1, DTYPE, size=16)[0]
    opt = esam(model.parameters(), model=model, momentum=0.9)
    opt.step(per_sample_closure(model, x, y)[0])
    w0, own0 = params_of(model), state(opt)
    clean_ref = copy.deepcopy(model)
    clean_ref(x)
    closure, calls = per_sample_closure(model, x, y, bad_call, mode="raise")
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert calls[0] == bad_call
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert_tree_equal(state(opt), own0)
    assert opt._pending is None and not opt._data  # no per-step data (clean losses) survives the step
    for (k, v), r in zip(model.named_buffers(), clean_ref.buffers()):
        assert torch.equal(v, r), k  # from the clean pass alone
    opt.step(per_sample_closure(model, x, y)[0])
    assert opt.step_count == 2


def test_running_stats_from_the_clean_pass_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = batches(1, DTYPE, size=16)[0]
    ref = copy.deepcopy(model)
    ref(x)
    opt = esam(model.parameters(), model=model)
    opt.step(per_sample_closure(model, x, y)[0])
    for (k, v), r in zip(model.named_buffers(), ref.buffers()):
        assert torch.equal(v, r), k


@pytest.mark.parametrize("kind", ["loss", "per_sample"])
def test_skip_inactive_grads_false_computes_every_gradient_same_step(kind):
    """``skip_inactive_grads=False`` (for torch.compile): no requires_grad
    switching, every clean gradient computed, the inactive ones ignored:
    the step of the default to rounding, and the masks unchanged."""
    runs = []
    for skip in (True, False):
        model = mlp(DTYPE, seed=0)
        opt = esam(model.parameters(), seed=ESAM_SEED, gamma=1.0 if kind == "loss" else 0.5, skip_inactive_grads=skip)
        for x, y in batches(3, DTYPE, size=16):
            mask = opt.tensor_mask()
            spy = Spy(opt, model, x, y, kind)
            opt.step(spy)
            assert spy.flags[0] == (mask if skip else [True] * len(mask))
        runs.append(params_of(model))
    torch.testing.assert_close(runs[0], runs[1], rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="skip_inactive_grads must be a bool"):
        esam(mlp(DTYPE).parameters(), skip_inactive_grads=1)
