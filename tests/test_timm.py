"""flatminima methods through timm's optimizer factory (docs/timm.md).

timm is not in the dev extra (its torchvision does not match the CPU torch
the suite runs on), so the tests marked ``needs_timm`` skip here; the names
and the missing-timm error are checked without it. docs/timm.md says how
the timm tests were run.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest
import torch
from helpers import assert_tree_equal, batches, make_closure
from torch import nn

import flatminima
import flatminima.timm

HAVE_TIMM = importlib.util.find_spec("timm") is not None
needs_timm = pytest.mark.skipif(not HAVE_TIMM, reason="timm is not installed (it is not in the dev extra)")


def test_names_timm_would_split_are_refused():
    """timm reads "flatsam_sgd" as SGD: an entry under that name could never be built."""
    msg = r"'flatsam_sgd' contains '_'.*builds the optimizer registered as 'sgd'.*use '-' instead, e\.g\. 'flatsam-sgd'"
    with pytest.raises(ValueError, match=msg):
        flatminima.timm.check_name("flatsam_sgd")
    with pytest.raises(ValueError, match=msg):  # before anything needs timm
        flatminima.timm.register("sam", name="flatsam_sgd")
    with pytest.raises(ValueError, match="must not be empty"):
        flatminima.timm.check_name("")
    with pytest.raises(TypeError, match="must be a str, got int"):
        flatminima.timm.check_name(3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Unknown method 'flatsam'"):
        flatminima.timm.register("flatsam")


def test_default_names_survive_timms_parsing():
    names = {m: flatminima.timm.timm_name(m, "adamw") for m in flatminima.list_methods()}
    assert names["sam_every_k"] == "sam-every-k-adamw" and names["sam"] == "sam-adamw"
    for name in names.values():
        assert flatminima.timm.check_name(name) == name.lower().split("_")[-1]  # timm's own parsing


@pytest.mark.skipif(HAVE_TIMM, reason="timm is installed")
def test_register_without_timm_says_how_to_install():
    with pytest.raises(ModuleNotFoundError, match=r"flatminima\.timm\.register needs timm .*pip install timm"):
        flatminima.timm.register("sam")


class _TinyViT(nn.Module):
    """A plain module with timm's ``no_weight_decay()`` (float64)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.pos_embed = nn.Parameter(0.1 * torch.randn(1, 1, 6, dtype=torch.float64))
        self.body = nn.Linear(6, 8).double()
        self.norm = nn.LayerNorm(8).double()
        self.head = nn.Linear(8, 3).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.tanh(self.body(x + self.pos_embed[0]))))

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed"}


def _train(model: nn.Module, opt: Any, steps: int = 3) -> None:
    for x, y in batches(steps):
        opt.step(make_closure(opt, model, x, y))


@needs_timm
@pytest.mark.parametrize(("method", "base", "cls", "extra"), [
    ("sam", "sgd", torch.optim.SGD, {"nesterov": True, "momentum": 0.9}),  # timm's SGD: Nesterov, momentum 0.9
    ("looksam", "adamw", torch.optim.AdamW, {"eps": 1e-6, "betas": (0.8, 0.95)}),
])
def test_create_optimizer_v2_builds_the_method(method: str, base: str, cls: type, extra: dict[str, Any]):
    """timm's factory builds the method over timm's base, with timm's
    weight-decay groups (``pos_embed`` exempt) and defaults, and trains
    bit for bit as ``flatminima.create`` on the same groups."""
    import timm.optim

    name = flatminima.timm.register(method, base, defaults={"rho": 0.1})
    assert name == f"{method}-{base}" and flatminima.timm.register(method, base, defaults={"rho": 0.1}) == name
    model = _TinyViT()
    timm_kwargs = {k: v for k, v in extra.items() if k != "nesterov"}  # nesterov: timm's default for "sgd"
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.05, weight_decay=0.01, **timm_kwargs)
    assert type(opt) is flatminima.get_method(method).cls and type(opt.base_optimizer) is cls
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.1]
    no_decay, decay = opt.param_groups
    assert {id(p) for p in no_decay["params"]} == {id(p) for p in (model.pos_embed, model.body.bias, model.norm.weight,
                                                                  model.norm.bias, model.head.bias)}
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.01)

    ref = _TinyViT()
    groups = [{"params": [ref.pos_embed, ref.body.bias, ref.norm.weight, ref.norm.bias, ref.head.bias], "weight_decay": 0.0},
              {"params": [ref.body.weight, ref.head.weight], "weight_decay": 0.01}]
    ref_opt = flatminima.create(method, groups, cls, lr=0.05, rho=0.1, **extra)
    _train(model, opt)
    _train(ref, ref_opt)
    assert_tree_equal(list(model.parameters()), list(ref.parameters()))
    assert_tree_equal(opt.state_dict(), ref_opt.state_dict())


@needs_timm
def test_underscore_names_are_what_timm_misreads():
    """Why names carry '-': timm builds its plain SGD for "flatsam_sgd"."""
    import timm.optim

    opt = timm.optim.create_optimizer_v2(_TinyViT(), "flatsam_sgd", lr=0.1)
    assert type(opt) is torch.optim.SGD


@needs_timm
def test_register_errors():
    import timm.optim

    with pytest.raises(ValueError, match=r"unknown timm base optimizer 'lookahead_sgd'.*list_optimizers"):
        flatminima.timm.register("sam", "lookahead_sgd")
    gcsam_sgd = flatminima.timm.register("gcsam", "sgd")
    with pytest.raises(ValueError, match=r"base 'gcsam-sgd' is itself a flatminima method \(gcsam\)"):
        flatminima.timm.register("sam", gcsam_sgd)
    with pytest.raises(ValueError, match=r"'adahessian' is second order"):
        flatminima.timm.register("sam", "adahessian")
    with pytest.raises(ValueError, match=r"name 'sgd' is already registered as .*pass another name="):
        flatminima.timm.register("sam", "sgd", name="sgd")
    with pytest.raises(ValueError, match=r"name 'gcsam-sgd' is already registered as .flatminima gcsam over"):
        flatminima.timm.register("gcsam", "sgd", defaults={"rho": 0.3})  # same name, other defaults
    assert type(timm.optim.create_optimizer_v2(_TinyViT(), "sgd", lr=0.1)) is torch.optim.SGD  # timm's own, kept
