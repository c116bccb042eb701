"""Distributed checkpoints (``torch.distributed.checkpoint``) of a flatminima optimizer through
flatminima.distributed, in one process (DCP without a process group); FSDP2 and DDP on two
ranks are in tests/test_fsdp.py.

* a run saved with ``dcp.save`` after k steps and loaded into a fresh model and optimizer
  continues bit for bit like the uninterrupted run (every method with state, SGD and Adam);
* saving changes nothing (before the first step, where placeholders are made, and mid-run);
* the state dict holds the base optimizer's momentum and the method's own state;
* torch's own helpers are refused with the way that works, and so is every mismatch.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import helpers
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import state_dict as torch_dsd

import flatminima
from flatminima.distributed import get_optimizer_state_dict, set_optimizer_state_dict

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

#: (method, base optimizer, options): the methods that keep state between steps, on SGD and Adam
CONFIGS = [
    ("sam", torch.optim.SGD, {"momentum": 0.9, "dampening": 0.1}),  # dampening: a pre-made buffer would differ
    ("sam", torch.optim.Adam, {}),
    ("looksam", torch.optim.Adam, {"k": 2}),
    ("looksam", torch.optim.SGD, {"k": 3, "layerwise": True, "momentum": 0.9}),
    ("friendly_sam", torch.optim.SGD, {"momentum": 0.9}),
    ("vasso", torch.optim.AdamW, {}),
    ("ae_sam", torch.optim.SGD, {"momentum": 0.9}),
    ("esam", torch.optim.SGD, {"momentum": 0.9, "beta": 0.5, "gamma": 0.5}),
    ("sam_every_k", torch.optim.Adam, {"k": 2}),
    ("momentum_sam", torch.optim.SGD, {"momentum": 0.9}),
    ("gsam", torch.optim.SGD, {"momentum": 0.9, "alpha": 0.3}),
]
IDS = [f"{m}-{b.__name__}{'-layerwise' if 'layerwise' in o else ''}" for m, b, o in CONFIGS]
STEPS, SAVE_AT = 5, 2
BATCHES = helpers.batches(STEPS)


def _opt(config: tuple[str, Any, dict[str, Any]], model: nn.Module) -> flatminima.SharpnessAware:
    method, base, options = config
    return flatminima.create(method, helpers.two_groups(model), base, lr=0.05, **options)


def _steps(opt: Any, model: nn.Module, start: int, stop: int) -> None:
    kind = _closure_kind(opt)
    for x, y in BATCHES[start:stop]:
        opt.step(helpers.make_closure(opt, model, x, y, kind))


def _closure_kind(opt: Any) -> str:
    return "per_sample" if isinstance(opt, flatminima.ESAM) else "loss"


def _save(model: nn.Module, opt: Any, path: Path) -> None:
    dcp.save({"model": torch_dsd.get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
             checkpoint_id=path)


def _resume(config: tuple[str, Any, dict[str, Any]], path: Path) -> tuple[nn.Module, Any]:
    model = helpers.mlp(seed=7)  # other weights: every value must come from the checkpoint
    opt = _opt(config, model)
    sd = {"model": torch_dsd.get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    torch_dsd.set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])
    return model, opt


def _run(config: tuple[str, Any, dict[str, Any]], save: Path | None = None, at: int = SAVE_AT) -> tuple[nn.Module, Any]:
    model = helpers.mlp()
    opt = _opt(config, model)
    _steps(opt, model, 0, at)
    if save is not None:
        _save(model, opt, save)
    _steps(opt, model, at, STEPS)
    return model, opt


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
def test_resumed_run_is_the_uninterrupted_run(config: Any, tmp_path: Path) -> None:
    """Saving changes nothing, and the run resumed from the checkpoint takes the same steps, bit for bit."""
    plain_model, plain = _run(config)
    saved_model, saved = _run(config, save=tmp_path)
    model, opt = _resume(config, tmp_path)
    _steps(opt, model, SAVE_AT, STEPS)
    for other_model, other in ((saved_model, saved), (model, opt)):
        for a, b in zip(plain_model.parameters(), other_model.parameters()):
            assert torch.equal(a, b)
        helpers.assert_tree_equal(other.state_dict(), plain.state_dict())


@pytest.mark.parametrize("config", [CONFIGS[0], CONFIGS[1], CONFIGS[2]], ids=IDS[:3])
def test_saving_before_the_first_step_changes_nothing(config: Any, tmp_path: Path) -> None:
    """Before any step the base optimizer's state is made as placeholders (Adam's step 1, SGD's
    buffer) and dropped again: the run, Adam's step counts and the counters do not move, and the
    run resumed from that checkpoint is the uninterrupted one."""
    plain_model, plain = _run(config)
    saved_model, saved = _run(config, save=tmp_path, at=0)
    model, opt = _resume(config, tmp_path)
    assert opt.state_dict()["base"]["state"] == {} and opt.counters["steps"] == 0
    _steps(opt, model, 0, STEPS)
    for other_model, other in ((saved_model, saved), (model, opt)):
        for a, b in zip(plain_model.parameters(), other_model.parameters()):
            assert torch.equal(a, b)
        helpers.assert_tree_equal(other.state_dict(), plain.state_dict())


def test_state_dict_holds_the_momentum_and_the_methods_state() -> None:
    model = helpers.mlp()
    opt = _opt(("looksam", torch.optim.SGD, {"momentum": 0.9, "k": 2}), model)
    _steps(opt, model, 0, 3)
    sd = get_optimizer_state_dict(model, opt)
    names = [n for n, _ in model.named_parameters()]
    weights = [n for n in names if n.endswith("weight")]
    assert sorted(sd) == ["flatminima", "method", "state"] and sorted(sd["state"]) == sorted(names)
    for (name, p) in model.named_parameters():
        assert sd["state"][name]["momentum_buffer"] is opt.base_optimizer.state[p]["momentum_buffer"]
        assert sd["method"][name]["g_v"] is opt.state[p]["g_v"]
    record = torch.load(io.BytesIO(sd["flatminima"]), weights_only=True)
    assert record["flatminima"]["counters"] == {"steps": 3, "perturbed_steps": 2, "skipped_steps": 0}
    assert record["flatminima"]["method_state"]["step"] == 3 and record["flatminima"]["method_state"]["g_v_norm"] > 0
    assert [g["params"] for g in record["param_groups"]] == [weights, [n for n in names if n not in weights]]
    assert record["held"]["state"] == {n: ["momentum_buffer"] for n in names}


def test_before_the_first_step_the_state_is_placeholders() -> None:
    model = helpers.mlp()
    opt = _opt(("looksam", torch.optim.Adam, {"k": 2}), model)
    before = [p.detach().clone() for p in model.parameters()]
    sd = get_optimizer_state_dict(model, opt)
    record = torch.load(io.BytesIO(sd["flatminima"]), weights_only=True)
    name = "0.weight"
    assert sorted(sd["state"][name]) == ["exp_avg", "exp_avg_sq", "step"] and sorted(sd["method"][name]) == ["g_v"]
    assert record["held"] == {"state": {}, "method": {}}  # placeholders, all of them
    assert dict(opt.base_optimizer.state) == {} and dict(opt.state) == {}
    assert all(p.grad is None for p in model.parameters()) and opt.param_groups[0]["lr"] == 0.05
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_torch_helpers_are_refused_with_the_way_that_works() -> None:
    """torch's helpers call step() without a closure before the first step, and after one keep
    ``opt.state`` alone (``state: {}``: no momentum); set_optimizer_state_dict loads that."""
    model = helpers.mlp()
    opt = _opt(CONFIGS[0], model)
    way = r"flatminima\.distributed\.get_optimizer_state_dict\(model, opt\)"
    with pytest.raises(TypeError, match=rf"helpers cannot save or load SAM: .*{way}"):
        torch_dsd.get_optimizer_state_dict(model, opt)
    _steps(opt, model, 0, 1)
    with pytest.raises(TypeError, match=way):
        torch_dsd.get_optimizer_state_dict(model, opt)  # gradients exist: no init step, state_dict() itself
    with pytest.raises(TypeError, match=way):
        torch_dsd.set_optimizer_state_dict(model, opt, {"state": {}, "param_groups": []})
    opt.zero_grad(set_to_none=True)
    with pytest.raises(TypeError, match=way):
        torch_dsd.set_optimizer_state_dict(model, opt, {"state": {}, "param_groups": []})
    with pytest.raises(ValueError, match=r"SAM.step\(\) needs a closure"):  # a plain call: the usual message
        opt.step()


def _template(method: str, base: Any, model: nn.Module | None = None, **options: Any) -> tuple[nn.Module, Any, dict[str, Any]]:
    model = model or helpers.mlp(seed=7)
    opt = flatminima.create(method, helpers.two_groups(model), base, lr=0.05, **options)
    return model, opt, {"optim": get_optimizer_state_dict(model, opt)}


def test_mismatches_are_refused(tmp_path: Path) -> None:
    _run(CONFIGS[4], save=tmp_path)  # FriendlySAM on SGD with momentum
    model, opt, sd = _template("friendly_sam", torch.optim.SGD)  # no momentum: the template has no buffers
    dcp.load(sd, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match=r"holds state \['momentum_buffer'\] for '0.weight', the state dict dcp.load filled holds \[\]"):
        set_optimizer_state_dict(model, opt, sd["optim"])
    model, opt, sd = _template("sam", torch.optim.SGD, momentum=0.9)  # no m: a template without it
    dcp.load(sd, checkpoint_id=tmp_path)
    with pytest.raises(ValueError, match=r"holds method \['m'\] for '0.weight'.*build the optimizer as the saving run did"):
        set_optimizer_state_dict(model, opt, sd["optim"])
    renamed = nn.Sequential(*helpers.mlp(seed=7)[:-1], nn.Identity(), helpers.mlp(seed=7)[-1])
    model, opt, sd = _template("friendly_sam", torch.optim.SGD, renamed, momentum=0.9)
    with pytest.raises(ValueError, match=r"lacks \['4.weight', '4.bias'\] and has \['5.weight', '5.bias'\] besides"):
        set_optimizer_state_dict(model, opt, {**sd["optim"], "flatminima": get_optimizer_state_dict(*_run(CONFIGS[4]))["flatminima"]})


def test_wrong_arguments_are_refused() -> None:
    model = helpers.mlp()
    opt = _opt(CONFIGS[0], model)
    with pytest.raises(ValueError, match=r"expects the state dict of flatminima.distributed.get_optimizer_state_dict"):
        set_optimizer_state_dict(model, opt, opt.state_dict())
    with pytest.raises(TypeError, match="for a plain optimizer use torch.distributed.checkpoint.state_dict"):
        get_optimizer_state_dict(model, opt.base_optimizer)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"6 of the optimizer's 6 parameters \(indices \[0, 1, 2, 3, 4\]\) are not parameters of the Sequential"):
        get_optimizer_state_dict(helpers.mlp(), opt)
    with pytest.raises(TypeError, match="model must be the torch.nn.Module the optimizer trains, got list"):
        get_optimizer_state_dict(list(model.parameters()), opt)  # type: ignore[arg-type]


def test_ddp_and_compile_wrappers_keep_the_models_names() -> None:
    model = helpers.mlp()
    opt = _opt(CONFIGS[0], model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model)
    sd = get_optimizer_state_dict(compiled, opt)
    assert sorted(sd["state"]) == sorted(n for n, _ in model.named_parameters())


@pytest.mark.parametrize("method", flatminima.list_methods())
def test_declared_param_state_is_what_each_method_keeps(method: str) -> None:
    """What a method keeps in ``opt.state[p]`` is declared (``Part.param_state``): a fresh optimizer's
    template holds a placeholder for each key."""
    model = helpers.mlp()
    opt = flatminima.create(method, model.parameters(), torch.optim.SGD, lr=0.05, momentum=0.9)
    _steps(opt, model, 0, 3)
    kept = {k for s in opt.state.values() for k in s}
    declared = {k for part in type(opt).parts() for k in part.param_state}
    assert kept == declared, method
