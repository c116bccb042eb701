"""Bad arguments and misuse of the protocol fail loudly, with messages that
name what was wrong; and a failed or abandoned step leaves everything as it
was."""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import flatminima
import helpers
from helpers import batches, make_closure, mlp, one_case_per_method, params_of
from methods_db import BAD_ARGS, CASES, DEFAULT_CASES

PER_METHOD = one_case_per_method(CASES)

DTYPE = torch.float64


def opt_for(case, params, base=torch.optim.SGD, **extra):
    kwargs = {**case.kwargs, **extra}
    if isinstance(base, type):
        kwargs.setdefault("lr", 0.1)
    return flatminima.create(case.method, params, base, **kwargs)


def backward(model, x, y):
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    return loss


def setup(case, **extra):
    model = mlp(dtype=DTYPE)
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    return model, opt_for(case, model.parameters(), **extra), x, y


# ---------------------------------------------------------------- BAD_ARGS


@pytest.mark.parametrize("bad", BAD_ARGS, ids=lambda b: f"{b.method}-{b.kwargs}")
def test_bad_args(bad):
    model = mlp(dtype=DTYPE)
    with pytest.raises(bad.error, match=bad.match):
        flatminima.create(bad.method, model.parameters(), torch.optim.SGD, lr=0.1, **bad.kwargs)


def _group_keys(method: str) -> set[str]:
    """The method's per-group hyperparameters (not the base optimizer's)."""
    probe = flatminima.create(method, [nn.Parameter(torch.zeros(1))], torch.optim.SGD, lr=0.1)
    return set(probe.param_groups[0]) - set(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1).param_groups[0])


#: BAD_ARGS whose every key is a per-group hyperparameter (max_grad_norm & co are constructor-only)
GROUP_BAD_ARGS = [b for b in BAD_ARGS if set(b.kwargs) <= _group_keys(b.method)]


def test_group_bad_args_not_empty():
    assert GROUP_BAD_ARGS


@pytest.mark.parametrize("bad", GROUP_BAD_ARGS, ids=lambda b: f"{b.method}-{b.kwargs}")
def test_bad_args_in_a_param_group(bad):
    """The same values given per group are rejected too."""
    model = mlp(dtype=DTYPE)
    group_keys = list(bad.kwargs)
    ps = list(model.parameters())
    groups = [{"params": ps[:2]}, {"params": ps[2:], **{k: bad.kwargs[k] for k in group_keys}}]
    with pytest.raises(bad.error, match=bad.match):
        flatminima.create(bad.method, groups, torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("bad", GROUP_BAD_ARGS, ids=lambda b: f"{b.method}-{b.kwargs}")
def test_bad_args_in_add_param_group(bad):
    """add_param_group rejects the value and adds nothing, to either optimizer."""
    model = mlp(dtype=DTYPE)
    ps = list(model.parameters())
    opt = flatminima.create(bad.method, ps[:2], torch.optim.SGD, lr=0.1)
    group_keys = list(bad.kwargs)
    with pytest.raises(bad.error, match=bad.match):
        opt.add_param_group({"params": ps[2:], **{k: bad.kwargs[k] for k in group_keys}})
    assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1


# ---------------------------------------------------------------- the protocol


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_second_step_before_first_step(case):
    model, opt, x, y = setup(case)
    backward(model, x, y)
    w0 = params_of(model)
    with pytest.raises(ValueError, match=re.escape("second_step() called before first_step()")):
        opt.second_step()
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt.step_count == 0


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_first_step_twice(case):
    model, opt, x, y = setup(case)
    backward(model, x, y)
    opt.first_step()
    w1 = params_of(model)
    with pytest.raises(ValueError, match=re.escape("first_step() called twice")):
        opt.first_step()
    assert all(torch.equal(a, b) for a, b in zip(w1, model.parameters())), "the second call must not perturb again"
    # the pending step can still be completed
    backward(model, x, y)
    opt.second_step()
    assert opt.step_count == 1


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_step_without_closure(case):
    model, opt, x, y = setup(case)
    backward(model, x, y)
    w0 = params_of(model)
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step()
    with pytest.raises(ValueError, match="needs a closure"):
        opt.step(None)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_step_with_non_callable_closure(case):
    _, opt, _, _ = setup(case)
    with pytest.raises(TypeError, match="closure must be callable, got int"):
        opt.step(closure=42)


NOT_OPTIMIZERS = {
    "str": ("sgd", "'sgd'"),
    "function": (lambda params, lr: None, "<function"),
    "module-class": (nn.Linear, "Linear"),
    "module-instance": (nn.Linear(2, 2), "Linear"),
    "int": (3, "3"),
    "optimizer-name-class-like": (type("SGD", (), {}), "SGD"),
}


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("what", list(NOT_OPTIMIZERS))
def test_base_optimizer_not_an_optimizer(case, what):
    base, shown = NOT_OPTIMIZERS[what]
    model = mlp(dtype=DTYPE)
    with pytest.raises(TypeError, match="base_optimizer must be") as info:
        flatminima.create(case.method, model.parameters(), base, **case.kwargs)
    assert shown in str(info.value)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_base_optimizer_sharpness_aware(case):
    model = mlp(dtype=DTYPE)
    inner = opt_for(case, model.parameters())
    with pytest.raises(TypeError, match="ordinary optimizer"):
        flatminima.create(case.method, model.parameters(), inner, **case.kwargs)
    cls = flatminima.get_method(case.method).cls
    with pytest.raises(TypeError, match="ordinary optimizer"):
        flatminima.create(case.method, model.parameters(), cls, **case.kwargs)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_base_kwargs_with_instance(case):
    model = mlp(dtype=DTYPE)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match=re.escape("['lr', 'momentum']")) as info:
        flatminima.create(case.method, model.parameters(), base, **case.kwargs, lr=0.1, momentum=0.9)
    assert "instance" in str(info.value)


class _NeedsClosure(torch.optim.SGD):
    """A base optimizer whose step() requires a closure, as LBFGS's does."""

    def step(self, closure):  # type: ignore[override]
        return super().step(closure)


@pytest.mark.parametrize("method", flatminima.list_methods())
def test_base_optimizers_that_cannot_be_driven(method):
    """A sharpness-aware step hands its base optimizer one dense direction in
    .grad and calls step() without a closure: LBFGS (and any optimizer whose
    step() needs its own closure) and SparseAdam are refused at construction
    (class or instance), with the reason."""
    model = mlp(dtype=DTYPE)
    for base in (torch.optim.LBFGS, torch.optim.LBFGS(model.parameters()), _NeedsClosure):
        with pytest.raises(TypeError, match=r"cannot wrap (LBFGS|_NeedsClosure): its step\(\) needs a closure of its own"):
            flatminima.create(method, model.parameters(), base, **({"lr": 0.1} if isinstance(base, type) else {}))
    for base in (torch.optim.SparseAdam, torch.optim.SparseAdam(model.parameters())):
        with pytest.raises(TypeError, match="cannot wrap SparseAdam: it takes sparse gradients only.*use Adam or AdamW"):
            flatminima.create(method, model.parameters(), base)


@pytest.mark.parametrize("method", flatminima.list_methods())
def test_unknown_keyword_names_both_option_sets(method):
    """A keyword neither the method nor the base optimizer takes: a TypeError
    that names the keyword, every option of the method and the base
    optimizer's arguments (not SGD's constructor blaming itself)."""
    model = mlp(dtype=DTYPE)
    with pytest.raises(TypeError, match="got unexpected keyword argument") as info:
        flatminima.create(method, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, bogus_option=1)
    msg = str(info.value)
    cls = flatminima.get_method(method).cls
    assert "'bogus_option': neither an option of " + cls.__name__ in msg, msg
    ours, theirs = msg.split("nor an argument of its base optimizer SGD")
    for name in flatminima.get_method(method).defaults():
        assert re.search(rf"\b{name}\b", ours), (name, msg)
    for name in ("lr", "momentum", "weight_decay", "nesterov"):
        assert re.search(rf"\b{name}\b", theirs), (name, msg)


def test_create_ae_sam_with_the_papers_r() -> None:
    """The issue's case: AE-SAM's target fraction is ``sam_fraction``."""
    model = mlp(dtype=DTYPE)
    with pytest.raises(TypeError, match=r"AESAM got unexpected keyword argument\(s\) 'r': .*sam_fraction.* SGD \(lr, mom"):
        flatminima.create("ae_sam", model.parameters(), torch.optim.SGD, r=0.3, lr=0.1)
    opt = flatminima.create("ae_sam", model.parameters(), torch.optim.SGD, sam_fraction=0.3, lr=0.1, nesterov=False)
    assert opt.sam_fraction == 0.3 and opt.param_groups[0]["lr"] == 0.1


def test_base_optimizer_with_var_keywords_checks_its_own() -> None:
    """A base optimizer taking ``**kwargs`` is handed every keyword the method does not take."""

    class Loose(torch.optim.SGD):
        def __init__(self, params, lr=0.1, **extra):
            self.extra = extra
            super().__init__(params, lr=lr)

    opt = flatminima.create("sam", mlp(dtype=DTYPE).parameters(), Loose, lr=0.2, anything=3)
    assert opt.base_optimizer.extra == {"anything": 3}


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_instance_over_other_parameters(case):
    model = mlp(dtype=DTYPE)
    ps = list(model.parameters())
    base = torch.optim.SGD(ps[:-1], lr=0.1)  # misses one parameter
    with pytest.raises(ValueError, match="does not hold the same parameters"):
        opt_for(case, ps, base)
    other = torch.optim.SGD(mlp(dtype=DTYPE).parameters(), lr=0.1)
    with pytest.raises(ValueError, match="does not hold the same parameters"):
        opt_for(case, ps, other)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_state_dict_mid_step(case):
    model, opt, x, y = setup(case)
    backward(model, x, y)
    opt.first_step()
    with pytest.raises(ValueError, match=re.escape("between first_step() and second_step()")):
        opt.state_dict()
    backward(model, x, y)
    opt.second_step()
    opt.state_dict()  # fine again


def test_sparse_gradients():
    for case in PER_METHOD:
        emb = nn.Embedding(10, 3, sparse=True).to(DTYPE)
        opt = opt_for(case, emb.parameters())
        w0 = emb.weight.detach().clone()

        def closure():
            opt.zero_grad()
            loss = emb(torch.tensor([1, 2, 5])).pow(2).sum()
            loss.backward()
            return loss

        with pytest.raises(TypeError, match="sparse gradients"):
            opt.step(closure)
        assert torch.equal(emb.weight, w0)
        closure()
        with pytest.raises(TypeError, match="sparse gradients"):
            opt.first_step()
        assert torch.equal(emb.weight, w0)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_complex_params(case):
    real = nn.Parameter(torch.randn(3, dtype=DTYPE))
    cplx = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    with pytest.raises(TypeError, match="complex parameters"):
        opt_for(case, [real, cplx])
    with pytest.raises(TypeError, match="complex parameters"):
        opt_for(case, [{"params": [real]}, {"params": [cplx], "lr": 0.01}])


def test_complex_params_in_add_param_group():
    real = nn.Parameter(torch.randn(3, dtype=DTYPE))
    cplx = nn.Parameter(torch.randn(3, dtype=torch.complex128))
    opt = opt_for(CASES[0], [real])
    with pytest.raises(TypeError, match="complex parameters"):
        opt.add_param_group({"params": [cplx]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("name", ["nope", "sam2", ""])
def test_unknown_method_name(name):
    model = mlp(dtype=DTYPE)
    known = flatminima.list_methods()
    assert known
    for call in (
        lambda: flatminima.get_method(name),
        lambda: flatminima.create(name, model.parameters(), torch.optim.SGD, lr=0.1),
    ):
        with pytest.raises(ValueError, match=re.escape(f"Unknown method {name!r}")) as info:
            call()
        for k in known:
            assert k in str(info.value)


def test_method_names_are_case_insensitive_and_typed():
    for name in flatminima.list_methods():
        assert flatminima.get_method(name.upper()) is flatminima.get_method(name)
    with pytest.raises(TypeError, match="method name must be a str"):
        flatminima.get_method(None)


# ---------------------------------------------------------------- load_state_dict


def trained(case, seed=0, params=None):
    model = mlp(dtype=DTYPE, seed=seed)
    opt = opt_for(case, model.parameters() if params is None else params, momentum=0.9)
    for x, y in batches(2, dtype=DTYPE, size=16):
        opt.step(make_closure(opt, model, x, y))
    return model, opt


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_load_state_dict_from_another_method_class(case):
    cls = flatminima.get_method(case.method).cls
    other_cls = type(f"Other{cls.__name__}", (cls,), {})
    _, opt = trained(case)
    sd = opt.state_dict()
    model = mlp(dtype=DTYPE)
    spec = flatminima.get_method(case.method)
    other = other_cls(model.parameters(), torch.optim.SGD, **{**spec.preset, **case.kwargs}, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match=re.escape(f"saved by {cls.__name__!r}")) as info:
        other.load_state_dict(sd)
    assert other_cls.__name__ in str(info.value)
    assert other.step_count == 0 and not other.base_optimizer.state


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_load_state_dict_other_shapes(case):
    _, opt = trained(case)
    sd = opt.state_dict()
    shapes = [p.shape for p in opt._all_params()]
    other = [nn.Parameter(torch.zeros(*s, dtype=DTYPE)) for s in shapes]
    other[2] = nn.Parameter(torch.zeros(shapes[2][0] + 1, *shapes[2][1:], dtype=DTYPE))
    target = opt_for(case, other, momentum=0.9)
    with pytest.raises(ValueError, match=r"parameter 2 has shape \[\d+, \d+\] here but \[\d+, \d+\] in the state dict"):
        target.load_state_dict(sd)
    assert target.step_count == 0 and not target.base_optimizer.state


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_load_state_dict_other_number_of_params(case):
    _, opt = trained(case)
    sd = opt.state_dict()
    n = len(opt._all_params())
    fewer = opt_for(case, list(mlp(dtype=DTYPE).parameters())[:-1])
    with pytest.raises(ValueError, match=f"state dict holds {n} parameters, this optimizer has {n - 1}"):
        fewer.load_state_dict(sd)
    # same parameters split into another number of groups
    ps = list(mlp(dtype=DTYPE).parameters())
    regrouped = opt_for(case, [{"params": ps[:3]}, {"params": ps[3:]}])
    with pytest.raises(ValueError, match="different number of parameter groups"):
        regrouped.load_state_dict(sd)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_load_state_dict_of_plain_optimizer(case):
    model, opt = trained(case)
    plain = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batches(1, dtype=DTYPE)[0]
    plain.zero_grad()
    backward(model, x, y)
    plain.step()
    for bad in (plain.state_dict(), {}, {"flatminima": {}}, None):
        with pytest.raises(ValueError, match="expects a state dict saved by a flatminima optimizer"):
            opt.load_state_dict(bad)
    # the documented way to load a plain optimizer's state works
    opt.base_optimizer.load_state_dict(plain.state_dict())


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_load_state_dict_bad_format(case):
    _, opt = trained(case)
    sd = opt.state_dict()
    sd["flatminima"] = {**sd["flatminima"], "format": 999}
    with pytest.raises(ValueError, match="unsupported flatminima state dict format 999"):
        opt.load_state_dict(sd)


# ---------------------------------------------------------------- abandoned steps


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_cancel_step_restores_weights(case):
    model, opt, x, y = setup(case, momentum=0.9)
    for _ in range(2):
        opt.step(make_closure(opt, model, x, y))
    w0 = params_of(model)
    base0 = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.base_optimizer.state.items()}
    counters0 = dict(opt.counters)
    opt.zero_grad()
    backward(model, x, y)
    perturbed = opt.first_step()
    if perturbed:
        assert not all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    opt.cancel_step()
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    assert opt.counters == counters0
    for k, s in opt.base_optimizer.state.items():
        for n, t in s.items():
            assert torch.equal(t, base0[k][n])
    opt.cancel_step()  # no step pending: a no-op
    with pytest.raises(ValueError, match="before first_step"):
        opt.second_step()
    # and the optimizer is usable
    opt.step(make_closure(opt, model, x, y))
    assert opt.step_count == counters0["steps"] + 1


class Boom(Exception):
    pass


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("with_model", [False, True])
def test_exception_in_perturbed_pass(case, with_model):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    opt = opt_for(case, model.parameters(), momentum=0.9, **({"model": model} if with_model else {}))
    opt.step(make_closure(opt, model, x, y))
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        if calls[0] == 2:
            raise Boom("perturbed pass failed")
        loss.backward()
        return loss

    # the first step that runs a perturbed pass raises there (methods that
    # perturb only on some steps take their one-pass steps until then)
    for _ in range(4):
        w0 = params_of(model)
        counters0 = dict(opt.counters)
        base0 = {k: {n: t.clone() for n, t in s.items()} for k, s in opt.base_optimizer.state.items()}
        clean_ref = copy.deepcopy(model)
        clean_ref(x)
        clean_stats = {k: v.clone() for k, v in clean_ref.named_buffers()}
        calls[0] = 0
        try:
            opt.step(closure)
        except Boom:
            break
        assert calls[0] == 1, "a step with a perturbed pass must raise"
    else:
        pytest.skip("no perturbed pass in 4 steps")
    for a, b in zip(w0, model.parameters()):
        assert torch.equal(a, b)
    assert opt.counters == counters0 and opt._pending is None
    for k, s in opt.base_optimizer.state.items():
        for n, t in s.items():
            assert torch.equal(t, base0[k][n])
    if with_model:  # the clean pass moved the stats, the failed perturbed pass did not
        for k, v in model.named_buffers():
            assert torch.equal(v, clean_stats[k]), k
    # usable afterwards
    opt.state_dict()
    opt.step(make_closure(opt, model, x, y))
    assert opt.step_count == counters0["steps"] + 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_exception_in_clean_pass_changes_nothing(case):
    model, opt, x, y = setup(case)
    w0 = params_of(model)

    def closure():
        raise Boom("clean pass failed")

    with pytest.raises(Boom):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(w0, model.parameters()))
    assert opt._pending is None and opt.step_count == 0
    opt.step(make_closure(opt, model, x, y))
    assert opt.step_count == 1


def test_model_must_be_a_module():
    for case in PER_METHOD:
        with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
            opt_for(case, mlp(dtype=DTYPE).parameters(), model=[1])


def test_params_single_tensor():
    for case in PER_METHOD:
        with pytest.raises(TypeError, match="single Tensor"):
            opt_for(case, torch.zeros(3, requires_grad=True))


@pytest.mark.parametrize("case", DEFAULT_CASES, ids=lambda c: c.id)
def test_perturbed_pass_without_backward_is_refused(case) -> None:
    """A closure that returns the loss without a backward at w + eps (or an
    explicit first_step(zero_grad=True) / second_step() with no backward in
    between) would descend along eps: refused, with w restored exactly."""
    if case.closure != "loss":
        pytest.skip("the per-sample form's backward is the optimizer's own")
    model = helpers.mlp()
    momentum = {"momentum": 0.9} if helpers.pre_pass(case.method) else {}  # it perturbs along the momentum
    opt = flatminima.create(case.method, model.parameters(), torch.optim.SGD, lr=0.1, **momentum, **case.kwargs)
    x, y = helpers.batches(1)[0]
    calls = []
    if helpers.pre_pass(case.method):  # its only pass is at w + eps once it has a momentum: take one step first
        opt.step(helpers.make_closure(opt, model, x, y))
        calls.append(0)  # the closure below is then its only (perturbed) pass

    def closure():
        calls.append(1)
        if len(calls) == 1:
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        return torch.nn.functional.cross_entropy(model(x), y)  # forgot the backward

    w0 = helpers.params_of(model)
    with pytest.raises(ValueError, match="the perturbed pass left no gradient"):
        opt.step(closure)
    if len(calls) == 1:
        pytest.skip(f"{case.id}: no perturbed pass at the first step")
    helpers.assert_tree_equal(helpers.params_of(model), w0)
    assert opt.step_count == (1 if helpers.pre_pass(case.method) else 0)

    torch.nn.functional.cross_entropy(model(x), y).backward()
    assert opt.first_step(zero_grad=True)
    with pytest.raises(ValueError, match="the perturbed pass left no gradient"):
        opt.second_step()
    helpers.assert_tree_equal(helpers.params_of(model), w0)
