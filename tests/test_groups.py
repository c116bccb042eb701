"""Param groups and everything that acts on them: the base optimizer given as
a class or an instance, per-group options, add_param_group, LR schedulers,
zero_grad, clipping, and split_param_groups (with ASAM's official scope)."""

from __future__ import annotations

import math
import re
import warnings

import pytest
import torch
from torch import nn

import flatminima
from helpers import (
    batches, explicit_step, make_closure, mlp, one_case_per_method, params_of, refuses_base, two_groups,
)
from methods_db import CASES

DTYPE = torch.float64
PER_METHOD = one_case_per_method(CASES)


def create(case, params, base=torch.optim.SGD, **extra):
    return flatminima.create(case.method, params, base, **{**case.kwargs, **extra})


def run(opt, model, data, api="closure", sched=None, seed0=0, kind="loss"):
    for i, (x, y) in enumerate(data):
        torch.manual_seed(seed0 + i)
        if api == "closure":
            opt.step(make_closure(opt, model, x, y, kind))
        else:
            explicit_step(opt, model, x, y, kind)
        if sched is not None:
            sched.step()


def same_params(a: nn.Module, b: nn.Module) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def perturbation(opt, model, x, y) -> list[torch.Tensor] | None:
    """w + eps - w after first_step (None when the step has no perturbed pass);
    the step is cancelled afterwards."""
    w0 = params_of(model)
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    perturbed = opt.first_step()
    eps = [p.detach() - w for p, w in zip(model.parameters(), w0)]
    opt.cancel_step()
    opt.zero_grad()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), w0))
    return eps if perturbed else None


# ---------------------------------------------------------------- base as class or instance


BASES = {
    "sgd": (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}),
    "adam": (torch.optim.Adam, {"lr": 1e-2}),
    "adadelta": (torch.optim.Adadelta, {"lr": 0.5}),
    "rmsprop": (torch.optim.RMSprop, {"lr": 1e-2}),
    "adafactor": (torch.optim.Adafactor, {"lr": 1e-2}),
}


def method_keys(method: str) -> set[str]:
    """The method's own param-group keys (what it adds to an SGD group)."""
    probe = [nn.Parameter(torch.zeros(1))]
    ours = flatminima.create(method, probe, torch.optim.SGD, lr=0.1).param_groups[0]
    return set(ours) - set(torch.optim.SGD(probe, lr=0.1).param_groups[0])


def base_keys(base: str) -> set[str]:
    cls, kw = BASES[base]
    return set(cls([nn.Parameter(torch.zeros(1))], **kw).defaults)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_instance_equals_class(case):
    """SGD with momentum and weight decay, given as class or as instance: the
    same run, bit for bit."""
    check_instance_equals_class(case, "sgd")


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_instance_equals_class_adam(case):
    """Adam too (its ``eps`` must not be confused with any option of the method)."""
    if method_keys(case.method) & base_keys("adam"):
        pytest.fail(f"{case.method} shares param-group keys with Adam: {method_keys(case.method) & base_keys('adam')}")
    check_instance_equals_class(case, "adam")


def check_instance_equals_class(case, base):
    cls, kw = BASES[base]
    data = batches(5, dtype=DTYPE, size=16)
    m1, m2 = mlp(dtype=DTYPE), mlp(dtype=DTYPE)
    o1 = create(case, m1.parameters(), cls, **kw)
    o2 = create(case, m2.parameters(), cls(m2.parameters(), **kw))
    assert o2.param_groups is o2.base_optimizer.param_groups
    run(o1, m1, data, kind=case.closure)
    run(o2, m2, data, kind=case.closure)
    assert same_params(m1, m2), case.id
    assert o1.counters == o2.counters
    s1, s2 = o1.base_optimizer.state_dict(), o2.base_optimizer.state_dict()
    assert s1["param_groups"] == s2["param_groups"], case.id
    for k in s1["state"]:
        for n, t in s1["state"][k].items():
            assert torch.equal(t, s2["state"][k][n])


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("form", ["class", "instance"])
def test_base_keeps_its_own_hyperparameters(case, base, form):
    """The two optimizers share one dict per group, so a key both define
    (Adadelta's rho, RMSprop's alpha...) would silently set the other's
    option: that is refused with a ValueError naming the keys. Otherwise the
    base runs with its own defaults for every option the user did not give,
    and a step runs."""
    cls, kw = BASES[base]
    plain = cls([nn.Parameter(torch.zeros(1))], **kw).param_groups[0]
    model = mlp(dtype=DTYPE)
    target = cls if form == "class" else cls(model.parameters(), **kw)
    extra = kw if form == "class" else {}
    clash = sorted(method_keys(case.method) & base_keys(base))
    if clash:
        with pytest.raises(ValueError, match=re.escape(str(clash))) as info:
            create(case, model.parameters(), target, **extra)
        assert cls.__name__ in str(info.value)
        return
    try:
        opt = create(case, model.parameters(), target, **extra)
    except ValueError as err:
        if refuses_base(case.method, cls, err):
            return  # it reads the base optimizer's momentum, which this one does not keep
        raise
    group = opt.param_groups[0]
    for key, value in plain.items():
        if key != "params":
            assert group[key] == value, f"{cls.__name__}'s {key} is {group[key]!r}, its default {value!r}"
    for key in method_keys(case.method):  # and the method's options are its own
        assert group[key] == opt.defaults[key]
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    opt.step(make_closure(opt, model, x, y))
    assert opt.step_count == 1


def test_some_bases_do_clash():
    """The clash branch above is exercised (SAM's rho is Adadelta's rho)."""
    assert method_keys(CASES[0].method) & base_keys("adadelta")


# ---------------------------------------------------------------- add_param_group


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_add_param_group(case):
    data = batches(3, dtype=DTYPE, size=16)
    m1, m2 = mlp(dtype=DTYPE), mlp(dtype=DTYPE)
    g1, g2 = two_groups(m1), two_groups(m2)
    override = {"rho": 0.0}

    o1 = create(case, [g1[0]], lr=0.05, momentum=0.9)
    new = {"params": g1[1]["params"], **override}
    o1.add_param_group(new)
    # both optimizers see the new group, one shared list
    assert o1.param_groups is o1.base_optimizer.param_groups and len(o1.param_groups) == 2
    assert o1.base_optimizer.param_groups[1] is o1.param_groups[1]
    # the new group got every default (method and base), except what it overrides
    for key, value in o1.defaults.items():
        if key not in override:
            assert o1.param_groups[1][key] == value or (value is None and o1.param_groups[1][key] is None), key
    assert o1.param_groups[1]["rho"] == 0.0

    # the override is used: the new params are not perturbed, the others are
    x, y = data[0]
    eps = perturbation(o1, m1, x, y)
    if eps is not None:
        new_ids = {id(p) for p in g1[1]["params"]}
        assert all(torch.count_nonzero(e) == 0 for p, e in zip(m1.parameters(), eps) if id(p) in new_ids)
        assert any(torch.count_nonzero(e) for p, e in zip(m1.parameters(), eps) if id(p) not in new_ids)

    # the same as building both groups at once, bit for bit; the new params train
    o2 = create(case, [g2[0], {"params": g2[1]["params"], **override}], lr=0.05, momentum=0.9)
    before = [p.detach().clone() for p in g1[1]["params"]]
    run(o1, m1, data)
    run(o2, m2, data)
    assert same_params(m1, m2)
    assert all(not torch.equal(a, p) for a, p in zip(before, g1[1]["params"]))
    assert all(p in o1.base_optimizer.state for p in g1[1]["params"])


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_add_param_group_invalid_rho(case):
    model = mlp(dtype=DTYPE)
    g = two_groups(model)
    opt = create(case, [g[0]], lr=0.1)
    for bad, err in ((-1.0, ValueError), (float("nan"), ValueError), ("0.1", TypeError)):
        with pytest.raises(err, match="rho"):
            opt.add_param_group({"params": g[1]["params"], "rho": bad})
        assert len(opt.param_groups) == len(opt.base_optimizer.param_groups) == 1
    with pytest.raises(TypeError, match="param_group must be a dict"):
        opt.add_param_group(g[1]["params"])
    # a parameter already in a group is refused by the base, and nothing is added
    with pytest.raises(ValueError):
        opt.add_param_group({"params": g[0]["params"][:1]})
    assert len(opt.param_groups) == 1
    opt.add_param_group({"params": g[1]["params"]})
    assert len(opt.param_groups) == 2


# ---------------------------------------------------------------- LR schedulers


class SpySGD(torch.optim.SGD):
    """Records, at every step, the lr of each group and the gradients it is fed."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen_lr: list[list[float]] = []
        self.seen_grads: list[list[torch.Tensor]] = []

    @torch.no_grad()
    def step(self, closure=None):
        self.seen_lr.append([g["lr"] for g in self.param_groups])
        self.seen_grads.append([p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return super().step(closure)


SCHEDULERS = {
    "steplr": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "cosine": lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=4, eta_min=0.001),
}


def scheduler_warnings(record) -> list[str]:
    return [str(w.message) for w in record if "lr_scheduler" in str(w.message)]


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
@pytest.mark.parametrize("api", ["closure", "explicit"])
def test_lr_scheduler_drives_the_base(case, sched_name, api):
    model = mlp(dtype=DTYPE)
    opt = create(case, model.parameters(), SpySGD, lr=0.1, momentum=0.9)
    sched = SCHEDULERS[sched_name](opt)
    expected = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i, (x, y) in enumerate(batches(5, dtype=DTYPE, size=16)):
            expected.append(sched.get_last_lr())
            run(opt, model, [(x, y)], api, seed0=i)
            sched.step()
            assert [g["lr"] for g in opt.base_optimizer.param_groups] == sched.get_last_lr()
    assert scheduler_warnings(record) == []
    assert opt.base_optimizer.seen_lr == expected
    assert len(set(map(tuple, expected))) > 1, "the schedule should have changed the lr"


def test_scheduler_warning_control():
    """Control: a scheduler stepped before any optimizer step does warn, so
    the 'no warning' check above can fail."""
    model = mlp(dtype=DTYPE)
    opt = flatminima.create(CASES[0].method, model.parameters(), torch.optim.SGD, lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        sched.step()
    assert scheduler_warnings(record)


# ---------------------------------------------------------------- zero_grad


def zero_grad_closure(opt, model, x, y, set_to_none: bool):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        for p in model.parameters():
            assert (p.grad is None) if set_to_none else (p.grad is None or not p.grad.any())
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_zero_grad_set_to_none_or_zero(case):
    data = batches(3, dtype=DTYPE, size=16)
    models = []
    for set_to_none in (True, False):
        model = mlp(dtype=DTYPE)
        opt = create(case, model.parameters(), lr=0.05, momentum=0.9)
        for i, (x, y) in enumerate(data):
            torch.manual_seed(i)
            opt.step(zero_grad_closure(opt, model, x, y, set_to_none))
        assert opt.step_count == len(data)
        opt.zero_grad(set_to_none=set_to_none)
        grads = [p.grad for p in model.parameters()]
        if set_to_none:
            assert all(g is None for g in grads)
        else:
            assert all(g is not None and not g.any() for g in grads)
        models.append(model)
    assert same_params(*models)
    assert not same_params(models[0], mlp(dtype=DTYPE)), "the runs should have trained"


# ---------------------------------------------------------------- clipping


def global_norm(tensors: list[torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.double().pow(2).sum()) for t in tensors))


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_max_grad_norm_bounds_the_direction(case):
    data = batches(4, dtype=DTYPE, size=16)
    bound = 1e-3
    m_free, m_clip = mlp(dtype=DTYPE), mlp(dtype=DTYPE)
    free = create(case, m_free.parameters(), SpySGD, lr=0.1)
    clip = create(case, m_clip.parameters(), SpySGD, lr=0.1, max_grad_norm=bound)
    run(free, m_free, data[:1])
    run(clip, m_clip, data)
    norms = [global_norm(gs) for gs in clip.base_optimizer.seen_grads]
    assert len(norms) == len(data)
    assert all(n <= bound for n in norms), norms
    # clipping did happen (the unclipped direction is longer) and kept the direction
    first_free = free.base_optimizer.seen_grads[0]
    first_clip = clip.base_optimizer.seen_grads[0]
    n_free = global_norm(first_free)
    assert n_free > bound
    assert norms[0] == pytest.approx(bound, rel=1e-4)
    for a, b in zip(first_clip, first_free):
        torch.testing.assert_close(a, b * (bound / n_free), rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("case", PER_METHOD, ids=lambda c: c.id)
def test_large_max_grad_norm_changes_nothing(case):
    data = batches(3, dtype=DTYPE, size=16)
    m_free, m_clip = mlp(dtype=DTYPE), mlp(dtype=DTYPE)
    free = create(case, m_free.parameters(), SpySGD, lr=0.1, momentum=0.9)
    clip = create(case, m_clip.parameters(), SpySGD, lr=0.1, momentum=0.9, max_grad_norm=1e6)
    run(free, m_free, data)
    run(clip, m_clip, data)
    for gs_free, gs_clip in zip(free.base_optimizer.seen_grads, clip.base_optimizer.seen_grads, strict=True):
        for a, b in zip(gs_free, gs_clip, strict=True):
            assert torch.equal(a, b)
    assert same_params(m_free, m_clip)


# ---------------------------------------------------------------- split_param_groups


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2, bias=False)
        self.temperature = nn.Parameter(torch.ones(()))  # 0-dim, no "weight" in its name
        self.gn = nn.GroupNorm(1, 4)


def ids(params) -> set[int]:
    return {id(p) for p in params}


def test_split_bias_and_norm():
    net = Net()
    groups = flatminima.split_param_groups(net, weights={"weight_decay": 5e-4}, others={"weight_decay": 0.0})
    assert len(groups) == 2
    main, rest = groups
    assert ids(main["params"]) == ids([net.conv.weight, net.fc.weight, net.head.weight])
    assert ids(rest["params"]) == ids(
        [
            net.conv.bias,
            net.bn.weight,
            net.bn.bias,
            net.fc.bias,
            net.ln.weight,
            net.ln.bias,
            net.temperature,
            net.gn.weight,
            net.gn.bias,
        ]
    )
    assert main["weight_decay"] == 5e-4 and rest["weight_decay"] == 0.0
    # the groups are accepted by every method, options applied to both optimizers
    for case in PER_METHOD:
        opt = create(case, flatminima.split_param_groups(net, others={"rho": 0.0}), lr=0.1)
        assert opt.param_groups[1]["rho"] == 0.0 and opt.base_optimizer.param_groups[1]["rho"] == 0.0


def test_split_asam_rule():
    net = Net()
    main, rest = flatminima.split_param_groups(net, rule="asam", weights={"adaptive": True}, others={"adaptive": False})
    # name contains "weight": BatchNorm/LayerNorm/GroupNorm gamma are in the first group
    assert ids(main["params"]) == ids(
        [net.conv.weight, net.bn.weight, net.fc.weight, net.ln.weight, net.head.weight, net.gn.weight]
    )
    assert ids(rest["params"]) == ids(
        [net.conv.bias, net.bn.bias, net.fc.bias, net.ln.bias, net.temperature, net.gn.bias]
    )
    assert main["adaptive"] is True and rest["adaptive"] is False


def test_split_shared_params_once_and_empty_groups_dropped():
    lin = nn.Linear(3, 3, bias=False)
    tied = nn.Sequential(lin, nn.Tanh(), lin)
    groups = flatminima.split_param_groups(tied)
    assert len(groups) == 1 and len(groups[0]["params"]) == 1
    assert flatminima.split_param_groups(nn.Sequential(nn.LayerNorm(3)))[0]["params"]
    assert len(flatminima.split_param_groups(nn.Sequential(nn.LayerNorm(3)))) == 1
    every = [p for g in flatminima.split_param_groups(Net()) for p in g["params"]]
    assert len(every) == len(list(Net().parameters()))


def test_split_errors():
    with pytest.raises(ValueError, match="Invalid rule value: 'weights'"):
        flatminima.split_param_groups(Net(), rule="weights")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module, got list"):
        flatminima.split_param_groups([nn.Parameter(torch.ones(1))])


def test_asam_official_scope_by_hand():
    """ASAM with split_param_groups(rule="asam", others={"adaptive": False}):
    eps = rho T^2 g / ||v|| for weights and rho g / ||v|| for biases, with one
    global ||v||^2 = sum_weights ||T g||^2 + sum_biases ||g||^2."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).to(DTYPE)
    x, y = batches(1, dtype=DTYPE, size=16)[0]
    rho, eta = 0.5, 0.01
    groups = flatminima.split_param_groups(model, rule="asam", others={"adaptive": False})
    opt = flatminima.create("asam", groups, torch.optim.SGD, rho=rho, eta=eta, lr=0.1)
    names = dict(model.named_parameters())
    w = {n: p.detach().clone() for n, p in names.items()}
    nn.functional.cross_entropy(model(x), y).backward()
    g = {n: p.grad.detach().clone() for n, p in names.items()}
    assert opt.first_step()
    eps = {n: p.detach() - w[n] for n, p in names.items()}
    opt.cancel_step()

    adaptive = {n: "weight" in n for n in names}
    assert sorted(n for n, a in adaptive.items() if not a) == ["0.bias", "1.bias", "3.bias"]
    t = {n: (w[n].abs() + eta) if adaptive[n] else torch.ones_like(w[n]) for n in names}
    norm = math.sqrt(sum(float((t[n] * g[n]).pow(2).sum()) for n in names))
    for n in names:
        expected = rho * t[n] * t[n] * g[n] / (norm + 1e-12)
        torch.testing.assert_close(eps[n], expected, rtol=1e-9, atol=1e-15, msg=n)
    # biases are not normalised: the fully adaptive form would differ for them
    full = {n: w[n].abs() + eta for n in names}
    for n in ("1.bias", "3.bias"):  # (0.bias feeds BatchNorm: its gradient is ~0)
        assert not torch.allclose(eps[n], rho * full[n] ** 2 * g[n] / (norm + 1e-12), rtol=1e-3)


class _TinyViT(nn.Module):
    """The parameters a ViT exempts through timm's ``no_weight_decay()``:
    tokens and position embeddings (3-dim, so no shape rule catches them).
    It lists ``dist_token``, which it does not have, as timm's ViT does."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.proj = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(2, 4)) for _ in range(2)])
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"cls_token", "pos_embed", "dist_token", "scales.*"}  # timm matches them with fnmatch


class _TinySwin(nn.Module):
    """Swin's convention: ``no_weight_decay_keywords()`` exempts every
    parameter whose name contains one of them."""

    def __init__(self) -> None:
        super().__init__()
        self.absolute_pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.layers = nn.ModuleList([_SwinBlock() for _ in range(2)])

    def no_weight_decay(self) -> list[str]:
        return ["absolute_pos_embed"]

    def no_weight_decay_keywords(self) -> tuple[str, ...]:
        return ("relative_position_bias_table",)


class _SwinBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.relative_position_bias_table = nn.Parameter(torch.zeros(9, 2))
        self.qkv = nn.Linear(4, 12)


def test_split_honours_no_weight_decay():
    vit = _TinyViT()
    main, rest = flatminima.split_param_groups(vit, weights={"weight_decay": 0.05}, others={"weight_decay": 0.0})
    assert ids(main["params"]) == ids([vit.proj.weight, *(b.weight for b in vit.blocks), vit.head.weight])
    assert ids(rest["params"]) == ids(
        [vit.cls_token, vit.pos_embed, vit.proj.bias, *(b.bias for b in vit.blocks), *vit.scales,
         vit.norm.weight, vit.norm.bias, vit.head.bias]
    )
    swin = _TinySwin()
    main, rest = flatminima.split_param_groups(swin)
    assert ids(main["params"]) == ids([b.qkv.weight for b in swin.layers])
    assert ids(rest["params"]) == ids(
        [swin.absolute_pos_embed, *(p for b in swin.layers for p in (b.relative_position_bias_table, b.qkv.bias))]
    )


def test_split_no_weight_decay_of_a_submodule_and_of_a_shared_parameter():
    """A backbone's own list counts inside the user's module (names relative
    to the backbone), and a tied parameter is exempt under either name."""
    vit = _TinyViT()
    vit.blocks[1].weight = vit.blocks[0].weight  # tied: first seen as blocks.0.weight

    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = vit

        def no_weight_decay(self) -> set[str]:
            return {"vit.blocks.1.weight"}

    main, rest = flatminima.split_param_groups(Tied())
    assert ids(main["params"]) == ids([vit.proj.weight, vit.head.weight])
    assert id(vit.blocks[0].weight) in ids(rest["params"])


def test_split_asam_rule_ignores_no_weight_decay():
    """rule="asam" is the official ASAM scope (names containing "weight"),
    which is not about weight decay: a listed ``head.weight`` stays adaptive."""

    class Listed(_TinyViT):
        def no_weight_decay(self) -> set[str]:
            return {"head.weight"}

    net = Listed()
    main, _ = flatminima.split_param_groups(net, rule="asam")
    assert id(net.head.weight) in ids(main["params"])
    main, rest = flatminima.split_param_groups(net)
    assert id(net.head.weight) in ids(rest["params"]) and id(net.head.weight) not in ids(main["params"])


def test_split_no_weight_decay_errors():
    class NotCallable(nn.Module):
        no_weight_decay = {"cls_token"}

    class OneString(_TinyViT):
        def no_weight_decay(self) -> str:  # type: ignore[override]
            return "cls_token"

    class NotNames(_TinySwin):
        def no_weight_decay_keywords(self) -> list[object]:  # type: ignore[override]
            return [("relative_position_bias_table",)]

    with pytest.raises(TypeError, match=r"NotCallable.no_weight_decay must be a method returning parameter names, got set"):
        flatminima.split_param_groups(NotCallable())
    with pytest.raises(TypeError, match=r"OneString.no_weight_decay\(\) must return a collection of str, got str 'cls_token'"):
        flatminima.split_param_groups(OneString())
    with pytest.raises(TypeError, match=r"NotNames.no_weight_decay_keywords\(\) must return a collection of str, got an item tuple"):
        flatminima.split_param_groups(NotNames())
