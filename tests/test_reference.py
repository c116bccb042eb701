"""Every configuration in methods_db.CASES against its plain reference
(tests/reference.py), in float64, step by step, through both APIs; the
first-step radius each method promises; the registry.

Driven by the database only: no test here knows a method by name.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import flatminima
import helpers
from methods_db import CASES, EQUIVALENCES, Case, build_schedulers

STEPS = 6
TOL = 1e-10

# Base optimizers as (class, kwargs).
#
# Adam/AdamW use eps=1e-3, not the default 1e-8: Adam's update is
# m / (sqrt(v) + eps), and its first steps are ~ lr * sign(g). For a gradient
# element that is ~1e-17 (rounding noise around an exact zero), a 1e-17
# difference between two correct implementations flips or rescales that
# element's step by ~lr, i.e. 1e-5 in the parameter - far above any
# meaningful tolerance. With eps=1e-3 the map g -> step has slope <= lr/eps
# = 10, so rounding differences stay at rounding level.
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "sgd-nesterov-wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3}),
    "sgd": (torch.optim.SGD, {"lr": 0.1}),
    "adam": (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-3}),
    "adamw": (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.1}),
}

DB_METHODS = sorted(
    {c.method for c in CASES} | {e.method for e in EQUIVALENCES} | {e.other for e in EQUIVALENCES if e.other}
)


def case_id(case: Case) -> str:
    return case.id


def build_pair(
    case: Case, base: str, second_group: dict[str, Any]
) -> tuple[nn.Module, flatminima.SharpnessAware, nn.Module, Any]:
    """The library optimizer over two groups (weights; biases with
    ``second_group``) and the reference over an identical copy of the model."""
    base_cls, base_kwargs = BASES[base]
    model = helpers.mlp(torch.float64, seed=0)
    ref_model = helpers.clone(model)
    opt = flatminima.create(case.method, helpers.two_groups(model, **second_group), base_cls, **base_kwargs, **case.kwargs)

    ref_params = [g["params"] for g in helpers.two_groups(ref_model)]
    hparams = [dict(case.ref_hparams), {**case.ref_hparams, **second_group}]
    ref_groups = [{"params": ps, **h} for ps, h in zip(ref_params, hparams)]
    # The reference's base optimizer gets its own group dicts, so the
    # reference's hyperparameters and the base optimizer's never mix.
    ref_base = base_cls([{"params": ps} for ps in ref_params], **base_kwargs)
    ref = case.reference(ref_groups, ref_base)
    return model, opt, ref_model, ref


@pytest.mark.parametrize("api", ["closure", "explicit"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_matches_reference(case: Case, base: str, api: str) -> None:
    assert case.second_group, f"{case.id}: the second group must differ from the first (set Case.second_group)"
    model, opt, ref_model, ref = build_pair(case, base, case.second_group)
    schedulers = build_schedulers(case, opt, ref.base)
    w0 = helpers.params_of(model)

    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(1000 + i)  # a method that draws random numbers draws the same ones in both
        if api == "closure":
            opt.step(helpers.make_closure(opt, model, x, y, case.closure))
        else:
            helpers.explicit_step(opt, model, x, y, case.closure)
        torch.manual_seed(1000 + i)
        ref.step(helpers.make_closure(ref.base, ref_model, x, y, case.closure))
        for scheduler in schedulers:
            scheduler.step()

        diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(ref_model))
        assert diff <= TOL, f"{case.id}/{base}/{api}: step {i + 1}: max |w - w_ref| = {diff:.3e}"

    moved = helpers.max_abs_diff(helpers.params_of(model), w0)
    assert moved > 1e-4, f"{case.id}/{base}: parameters did not move ({moved:.3e})"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_second_group_options_reach_the_step(case: Case) -> None:
    """The per-group options must matter: the reference with the second
    group's options left out gives different weights, so
    test_matches_reference could not pass with them ignored."""
    if not case.second_group:
        pytest.skip(f"{case.id}: no per-group options to compare")
    base = "sgd-momentum" if helpers.pre_pass(case.method) else "sgd"  # it perturbs along the momentum
    model, opt, ref_model, _ = build_pair(case, base, case.second_group)
    _, _, ref_model2, ref_same = build_pair(case, base, {})
    schedulers = build_schedulers(case, opt, ref_same.base)
    for x, y in helpers.batches(2, torch.float64):
        torch.manual_seed(0)
        opt.step(helpers.make_closure(opt, model, x, y, case.closure))
        torch.manual_seed(0)
        ref_same.step(helpers.make_closure(ref_same.base, ref_model2, x, y, case.closure))
        for sch in schedulers:
            sch.step()
    diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(ref_model2))
    assert diff > 1e3 * TOL, f"{case.id}: second group options {case.second_group} change nothing ({diff:.3e})"


# ---------------------------------------------------------------- first step


def radius_norms(
    case: Case, hparams: list[dict[str, Any]], saved: list[list[torch.Tensor]], perturbed: list[list[torch.Tensor]]
) -> list[float]:
    """Per group, the norm the method promises to fix: ||eps_g|| or ||T_w^-1 eps_g||."""
    out = []
    for h, ws, ps in zip(hparams, saved, perturbed):
        total = torch.zeros((), dtype=torch.float64)
        for w, p in zip(ws, ps):
            eps = p - w  # the perturbation actually applied
            if case.norm_kind == "asam":
                t = w.abs() + h["eta"]
                assert torch.all(eps[t == 0] == 0), "eps must vanish where T_w = 0"
                eps = torch.where(t == 0, torch.zeros_like(eps), eps / torch.where(t == 0, torch.ones_like(t), t))
            total = total + (eps.double() ** 2).sum()
        out.append(total.sqrt().item())
    return out


INVARIANT_CASES = [c for c in CASES if c.norm_kind is not None]


@pytest.mark.parametrize("layout", ["one-group", "two-groups"])
@pytest.mark.parametrize("case", INVARIANT_CASES, ids=case_id)
def test_first_step_radius(case: Case, layout: str) -> None:
    model = helpers.mlp(torch.float64, seed=2)
    if layout == "one-group":
        groups: list[Any] = [{"params": list(model.parameters())}]
        hparams = [dict(case.ref_hparams)]
    else:
        groups = helpers.two_groups(model, **case.second_group)
        hparams = [dict(case.ref_hparams), {**case.ref_hparams, **case.second_group}]
    opt = flatminima.create(case.method, groups, torch.optim.SGD, lr=0.1, **case.kwargs)
    if case.scheduler is not None:
        case.scheduler(opt)  # built, not stepped: the first step runs at the initial lr
    x, y = helpers.batches(1, torch.float64)[0]
    # eps = rho v / (||v|| + eps0): ||eps|| falls short of rho by eps0/||v||
    # relative. A large loss makes ||v|| >= ~40, so that offset is < 1e-13
    # and the check at 1e-12 tests the formula, not the offset.
    (1e3 * nn.functional.cross_entropy(model(x), y)).backward()
    saved = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    assert opt.first_step() is True
    perturbed = [[p.detach().clone() for p in g["params"]] for g in opt.param_groups]
    opt.cancel_step()

    norms = radius_norms(case, hparams, saved, perturbed)
    rhos = [h["rho"] for h in hparams]
    for n, rho in zip(norms, rhos):
        if rho == 0:
            assert n == 0.0
    # one group: ||.|| = rho; several: sum_g (||.||_g / rho_g)^2 = 1
    ratio = sum((n / rho) ** 2 for n, rho in zip(norms, rhos) if rho > 0) ** 0.5
    assert abs(ratio - 1.0) <= 1e-12, f"{case.id}/{layout}: norms {norms} for rho {rhos}: ratio - 1 = {ratio - 1:.3e}"
    if layout == "one-group":
        assert abs(norms[0] - rhos[0]) <= 1e-12 * rhos[0]
    # the restore after cancel_step is exact
    for g, ws in zip(opt.param_groups, saved):
        for p, w in zip(g["params"], ws):
            assert torch.equal(p, w)


# ---------------------------------------------------------------- registry


@pytest.mark.parametrize("name", DB_METHODS)
def test_registered_and_buildable(name: str) -> None:
    assert name in flatminima.list_methods(), f"{name!r} is in the test database but not registered"
    model = helpers.mlp()
    opt = flatminima.create(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
    assert isinstance(opt, flatminima.SharpnessAware)
    assert isinstance(opt.base_optimizer, torch.optim.SGD)
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[0]["momentum"] == 0.9
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    # the method's registered defaults are what the groups hold
    for key, value in flatminima.get_method(name).defaults().items():
        if key in opt.param_groups[0]:
            assert opt.param_groups[0][key] == value, f"{name}: group {key}={opt.param_groups[0][key]!r}, default {value!r}"


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_create_applies_case_kwargs(case: Case) -> None:
    model = helpers.mlp()
    opt = flatminima.create(case.method, model.parameters(), torch.optim.SGD, lr=0.1, **case.kwargs)
    for key, value in case.kwargs.items():
        if key in opt.param_groups[0]:
            assert opt.param_groups[0][key] == value


#: torch optimizers as (class, options that differ from their defaults)
TORCH_BASES: list[tuple[type[torch.optim.Optimizer], dict[str, Any]]] = [
    (torch.optim.SGD, {"lr": 0.05, "momentum": 0.8, "weight_decay": 1e-4}),
    (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-3, "betas": (0.8, 0.9)}),
    (torch.optim.AdamW, {"lr": 1e-2, "eps": 1e-3, "weight_decay": 0.2}),
    (torch.optim.RMSprop, {"lr": 1e-2, "alpha": 0.9, "eps": 1e-4}),
    (torch.optim.Adagrad, {"lr": 1e-2, "eps": 1e-5}),
    (torch.optim.Adadelta, {"lr": 0.5, "rho": 0.8, "eps": 1e-5}),
    (torch.optim.NAdam, {"lr": 1e-2, "eps": 1e-4}),
    (torch.optim.RAdam, {"lr": 1e-2, "eps": 1e-4}),
    (torch.optim.Adamax, {"lr": 1e-2, "eps": 1e-4}),
]


@pytest.mark.parametrize("base", TORCH_BASES, ids=lambda b: b[0].__name__)
@pytest.mark.parametrize("name", DB_METHODS)
def test_method_keys_do_not_shadow_base_options(name: str, base: tuple[type, dict[str, Any]]) -> None:
    """The method and its base optimizer share param-group dicts, so a
    method hyperparameter named like a base option (SAM's old ``eps`` vs
    Adam's) would set both. Either the base optimizer gets exactly the
    options a plain one would, or construction refuses and names the key."""
    base_cls, base_kwargs = base
    shared = helpers.shared_group_keys(name, base_cls)
    if shared:
        with pytest.raises(ValueError, match=sorted(shared)[0]):
            flatminima.create(name, [nn.Parameter(torch.zeros(2))], base_cls, **base_kwargs)
        return
    try:
        opt = flatminima.create(name, [nn.Parameter(torch.zeros(2))], base_cls, **base_kwargs)
    except ValueError as err:
        if helpers.refuses_base(name, base_cls, err):
            return  # it reads the base optimizer's momentum, which this one does not keep
        raise
    plain = base_cls([nn.Parameter(torch.zeros(2))], **base_kwargs).param_groups[0]
    for key, value in plain.items():
        if key != "params":
            got = opt.base_optimizer.param_groups[0][key]
            assert got == value, f"{name}: {base_cls.__name__}'s {key} is {got!r}, a plain one has {value!r}"
