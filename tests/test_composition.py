"""Every valid product of the three axes against its composed reference.

The products are generated from tests/reference.py (``VALID_PRODUCTS``:
every ascent chain x combine x schedule that can work), not listed here.
Each is built with ``flatminima.compose`` and must match
``compose_reference`` of the same parts in float64 to 1e-12, step by step,
on an SGD-momentum and an Adam base, through ``step(closure)`` and through
the explicit API. The invalid products must be refused by both, naming
both parts.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
from torch import nn

import flatminima
import helpers
from flatminima._parts import Schedule
from reference import COMBINES, SCHEDULES, VALID_PRODUCTS, compose_reference, product_hparams

STEPS = 4  # every_k (k = 2) and LookSAM's reuse see both kinds of step; momentum perturbs from step 2
TOL = 1e-12
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "sgd-momentum": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
    "adam": (torch.optim.Adam, {"lr": 1e-2, "eps": 1e-3}),
}


def _id(product: tuple[tuple[str, ...], str, str]) -> str:
    chain, combine, schedule = product
    return f"{'+'.join(chain) or 'sam'}|{combine}|{schedule}"


@pytest.mark.parametrize("api", ["closure", "explicit"])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("product", VALID_PRODUCTS, ids=_id)
def test_product_matches_composed_reference(product: tuple[tuple[str, ...], str, str], base: str, api: str) -> None:
    chain, combine, schedule = product
    hparams = product_hparams(chain, combine, schedule)
    base_cls, base_kwargs = BASES[base]
    model = helpers.mlp(torch.float64, seed=0)
    ref_model = helpers.clone(model)
    opt = flatminima.compose(
        helpers.two_groups(model), base_cls, ascent=list(chain) or "sam", combine=combine, schedule=schedule,
        **hparams, **base_kwargs,
    )
    ref_params = [g["params"] for g in helpers.two_groups(ref_model)]
    ref = compose_reference(list(chain), combine, schedule)(
        [{"params": ps, **hparams} for ps in ref_params], base_cls([{"params": ps} for ps in ref_params], **base_kwargs)
    )
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        if api == "closure":
            loss = opt.step(helpers.make_closure(opt, model, x, y))
        else:
            loss = helpers.explicit_step(opt, model, x, y)
        ref_loss = ref.step(helpers.make_closure(ref.base, ref_model, x, y))
        if api == "closure" or not chain[:1] == ("momentum",):  # the explicit API's loss is the clean pass's
            assert abs(float(loss) - float(ref_loss)) <= TOL, f"step {i}: loss"
        diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(ref_model))
        assert diff <= TOL, f"step {i}: weights differ by {diff:.3e}"
    assert opt.step_count == STEPS and opt.skipped_steps == 0
    assert opt.perturbed_steps == sum(ref.decisions)


_ALL = [
    (chain, combine, schedule)
    for chain, combine, schedule in itertools.product(
        [("asam",), ("fisher",), ("friendly",), ("vasso",), ("esam",), ("momentum",), ("fisher", "asam"),
         ("asam", "momentum")],
        COMBINES, SCHEDULES,
    )
]
INVALID = [p for p in _ALL if p not in VALID_PRODUCTS]


@pytest.mark.parametrize("product", INVALID, ids=_id)
def test_invalid_product_is_refused(product: tuple[tuple[str, ...], str, str]) -> None:
    chain, combine, schedule = product
    with pytest.raises(ValueError) as lib:
        flatminima.method_class(list(chain), combine, schedule)
    with pytest.raises(ValueError):
        compose_reference(list(chain), combine, schedule)
    named = [p for p in (*chain, combine, schedule) if f"'{p}'" in str(lib.value)]
    assert len(named) >= 2 or "first in the chain" in str(lib.value), str(lib.value)


def test_unknown_part_and_bad_option_are_named() -> None:
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="unknown combine 'wsamm'; known: gsam, looksam, sam, wsam"):
        flatminima.compose(params, torch.optim.SGD, combine="wsamm", lr=0.1)
    with pytest.raises(ValueError, match="Invalid k value: 0"):
        flatminima.compose(params, torch.optim.SGD, schedule="every_k", k=0, lr=0.1)
    with pytest.raises(ValueError, match="skip_inactive_grads=True needs SAM's combine"):
        flatminima.compose(params, torch.optim.SGD, ascent="esam", schedule="every_k", skip_inactive_grads=True, lr=0.1)


def test_one_class_per_product_so_state_dicts_travel() -> None:
    """The same parts give the same class: a state dict saved by one instance
    loads into another; another product's is refused."""
    model = helpers.mlp(torch.float64)
    make = lambda **kw: flatminima.compose(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, **kw)  # noqa: E731
    a, b = make(ascent="fisher", combine="gsam"), make(ascent="fisher", combine="gsam")
    assert type(a) is type(b) and type(a).__name__ == "Composed[fisher|gsam|always]"
    for x, y in helpers.batches(2, torch.float64):
        a.step(helpers.make_closure(a, model, x, y))
    b.load_state_dict(a.state_dict())
    helpers.assert_tree_equal(b.state_dict(), a.state_dict())
    with pytest.raises(ValueError, match="cannot load it into"):
        make(ascent="vasso").load_state_dict(a.state_dict())


def test_paper_methods_are_presets_of_the_composition() -> None:
    """A paper class and ``compose`` of its parts take the same steps, bit for bit."""
    for name, parts, kwargs in [
        ("fisher_sam", ("fisher", "sam", "always"), {"rho": 0.1}),
        ("looksam", ("sam", "looksam", "every_k"), {}),
        ("momentum_sam", ("momentum", "sam", "always"), {"rho": 0.3}),
    ]:
        m1, m2 = helpers.mlp(torch.float64), helpers.mlp(torch.float64)
        o1 = flatminima.create(name, m1.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)
        o2 = flatminima.compose(m2.parameters(), torch.optim.SGD, ascent=parts[0], combine=parts[1],
                                schedule=parts[2], lr=0.1, momentum=0.9, **kwargs)
        for x, y in helpers.batches(4, torch.float64):
            o1.step(helpers.make_closure(o1, m1, x, y))
            o2.step(helpers.make_closure(o2, m2, x, y))
        assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters())), name


class _Noted(Schedule):
    """A schedule written as docs/composition.md says: it perturbs on the steps
    whose closure noted ``sharp=True`` (per-step data handed by the closure)."""

    name = "noted-in-tests"

    def decide(self, opt: Any, ctx: Any) -> bool:
        return bool(ctx.data.get("sharp", False))


def test_a_new_part_and_closure_data() -> None:
    """A part defined outside the package composes like the shipped ones, and
    reads what the closure handed to the step with ``opt.note``; the note does
    not outlive its step."""
    model = helpers.mlp(torch.float64)
    opt = flatminima.compose(model.parameters(), torch.optim.SGD, schedule="noted-in-tests", lr=0.1)
    calls: list[int] = []
    for i, (x, y) in enumerate(helpers.batches(4, torch.float64)):
        inner = helpers.make_closure(opt, model, x, y)

        def closure(i: int = i, inner: Any = inner) -> torch.Tensor:
            calls.append(i)
            if i % 2 == 0 and calls.count(i) == 1:
                opt.note(sharp=True)
            return inner()

        opt.step(closure)
    assert calls == [0, 0, 1, 2, 2, 3] and opt.perturbed_steps == 2 and opt._data == {}


def test_chains_name_each_part_once_and_a_subclass_keeps_its_signature() -> None:
    for chain, match in [([], "at least one part"), (["asam", "asam"], "names each part once"),
                         (["asam", "momentum"], "put it first in the chain, before 'asam'"),
                         (["momentum", "esam"], "'momentum' ascent and 'esam' ascent")]:
        with pytest.raises(ValueError, match=match):
            flatminima.method_class(chain)

    class MySAM(flatminima.SAM):
        def __init__(self, params: Any, base_optimizer: Any, *, warmup: int = 10, **kw: Any) -> None:
            super().__init__(params, base_optimizer, **kw)
            self.warmup = warmup

    import inspect

    assert "warmup" in inspect.signature(MySAM).parameters
    assert flatminima.MethodSpec("my_sam", MySAM, "-", "-").defaults() == {"warmup": 10}
    assert list(inspect.signature(flatminima.SAM).parameters)[:3] == ["params", "base_optimizer", "rho"]
