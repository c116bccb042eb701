"""GSAM's radius schedule: rho_t follows the group's lr between lr_min and
lr_max; the lr range comes from the arguments, the scheduler's initial_lr,
the first step's lr (saved with the state dict) or ``set_lr_range``."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as S

import flatminima
from helpers import batches, make_closure, mlp


def gsam(lr: float = 0.1, **kwargs) -> flatminima.GSAM:
    return flatminima.GSAM([nn.Parameter(torch.ones(3))], torch.optim.SGD, lr=lr, **kwargs)


def radius(opt: flatminima.GSAM, i: int = 0) -> float:
    return float(opt.current_rho(opt.param_groups[i]))


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_constant_rho_without_rho_min():
    opt = gsam(rho=0.3, lr_max=1.0, lr_min=0.0)
    opt.param_groups[0]["lr"] = 0.25
    assert radius(opt) == 0.3


@pytest.mark.parametrize(("lr", "expected"), [(0.1, 0.5), (0.05, 0.3), (0.01, 0.14), (0.2, 0.5), (0.0, 0.1)])
def test_linear_in_lr_and_clamped(lr, expected):
    opt = gsam(rho=0.5, rho_min=0.1, lr_max=0.1, lr_min=0.0)
    opt.param_groups[0]["lr"] = lr
    assert radius(opt) == pytest.approx(expected, abs=1e-15)


def test_equal_lr_bounds_give_rho():
    opt = gsam(rho=0.5, rho_min=0.1, lr_max=0.1, lr_min=0.1)
    opt.param_groups[0]["lr"] = 0.03
    assert radius(opt) == 0.5


def test_initial_lr_is_the_default_lr_max():
    opt = gsam(lr=0.2, rho=0.4, rho_min=0.0)
    sched = S.LinearLR(opt, start_factor=1.0, end_factor=0.5, total_iters=2)
    assert opt.lr_range(opt.param_groups[0]) == (0.0, 0.2)
    p = opt.param_groups[0]["params"][0]
    for _ in range(2):
        p.grad = torch.ones_like(p)
        opt.first_step()
        p.grad = torch.ones_like(p)  # the perturbed pass's gradient
        opt.second_step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert radius(opt) == pytest.approx(0.2)
    assert "recorded_lr_max" not in opt.param_groups[0]


def test_first_lr_is_recorded_and_survives_a_checkpoint():
    """Without lr_max and without a torch scheduler the first step's lr is
    the peak; it is recorded in the group and restored by load_state_dict.
    A resumed run whose checkpoint lost it would take a later (smaller) lr as
    the peak and use a larger radius."""
    data = batches(6, torch.float64, size=16)

    def build(seed=0):
        model = mlp(torch.float64, seed=seed)
        return model, flatminima.GSAM(model.parameters(), torch.optim.SGD, rho=0.2, rho_min=0.0, alpha=0.3, lr=0.1)

    def run(model, opt, batch):
        for x, y in batch:
            opt.step(make_closure(opt, model, x, y))
            for g in opt.param_groups:
                g["lr"] *= 0.5

    m_ref, o_ref = build()
    run(m_ref, o_ref, data)
    assert o_ref.param_groups[0]["recorded_lr_max"] == 0.1

    m_a, o_a = build()
    run(m_a, o_a, data[:3])
    ckpt = roundtrip({"model": m_a.state_dict(), "opt": o_a.state_dict()})
    assert ckpt["opt"]["base"]["param_groups"][0]["recorded_lr_max"] == 0.1

    m_b, o_b = build(seed=3)
    m_b.load_state_dict(ckpt["model"])
    o_b.load_state_dict(ckpt["opt"])
    assert radius(o_b) == pytest.approx(0.2 * 0.0125 / 0.1)  # lr = 0.1 * 0.5**3
    run(m_b, o_b, data[3:])
    assert all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_b.parameters()))

    # control: the same checkpoint without the recorded peak diverges
    m_c, o_c = build(seed=3)
    m_c.load_state_dict(ckpt["model"])
    lost = roundtrip(ckpt["opt"])
    del lost["base"]["param_groups"][0]["recorded_lr_max"]
    o_c.load_state_dict(lost)
    run(m_c, o_c, data[3:])
    assert not all(torch.equal(p, q) for p, q in zip(m_ref.parameters(), m_c.parameters()))


def test_nothing_is_recorded_by_a_skipped_step():
    opt = gsam(rho=0.2, rho_min=0.0)
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.full_like(p, float("nan"))
    with pytest.warns(RuntimeWarning):
        opt.first_step()
        opt.second_step()
    assert "recorded_lr_max" not in opt.param_groups[0]
    p.grad = torch.ones_like(p)
    assert opt.first_step()
    p.grad = torch.full_like(p, float("inf"))
    opt.second_step()
    assert "recorded_lr_max" not in opt.param_groups[0]


def two_group_opt(lr=0.1):
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    return flatminima.GSAM([{"params": [a]}, {"params": [b], "lr": lr / 10}], torch.optim.SGD, lr=lr, rho_min=0.0)


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda o: S.CosineAnnealingLR(o, T_max=10, eta_min=0.001), [(0.001, 0.1), (0.001, 0.01)]),
        (lambda o: S.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=0.002), [(0.002, 0.1), (0.002, 0.01)]),
        (lambda o: S.LinearLR(o, start_factor=1.0, end_factor=0.1, total_iters=5), [(0.01, 0.1), (0.001, 0.01)]),
        (lambda o: S.LinearLR(o, start_factor=0.25, end_factor=1.0, total_iters=5), [(0.025, 0.1), (0.0025, 0.01)]),
        (lambda o: S.ConstantLR(o, factor=0.5, total_iters=3), [(0.05, 0.1), (0.005, 0.01)]),
        (lambda o: S.OneCycleLR(o, max_lr=[1.0, 0.5], total_steps=10), [(1.0 / 25 / 1e4, 1.0), (0.5 / 25 / 1e4, 0.5)]),
        (lambda o: S.CyclicLR(o, base_lr=[0.01, 0.001], max_lr=[0.2, 0.02]), [(0.01, 0.2), (0.001, 0.02)]),
        (lambda o: S.StepLR(o, step_size=3), [(0.0, 0.1), (0.0, 0.01)]),
        (lambda o: S.ExponentialLR(o, gamma=0.9), [(0.0, 0.1), (0.0, 0.01)]),
        (lambda o: S.PolynomialLR(o, total_iters=5), [(0.0, 0.1), (0.0, 0.01)]),
        (lambda o: S.ReduceLROnPlateau(o, min_lr=1e-4), [(1e-4, 0.1), (1e-4, 0.01)]),
        (
            lambda o: S.SequentialLR(
                o,
                [S.LinearLR(o, start_factor=0.1, total_iters=2), S.CosineAnnealingLR(o, T_max=8, eta_min=0.0002)],
                milestones=[2],
            ),
            [(0.0002, 0.1), (0.0002, 0.01)],
        ),
    ],
    ids=[
        "cosine", "warm-restarts", "linear-decay", "linear-warmup", "constant", "onecycle", "cyclic", "step",
        "exponential", "polynomial", "plateau", "sequential",
    ],
)
def test_set_lr_range(make, expected):
    opt = two_group_opt()
    sched = make(opt)
    got = opt.set_lr_range(sched)
    assert [pytest.approx(r) for r in expected] == got
    for group, (lo, hi) in zip(opt.param_groups, got):
        assert (group["lr_min"], group["lr_max"]) == (lo, hi)
        assert opt.lr_range(group) == (lo, hi)


def test_set_lr_range_on_the_base_optimizer_scheduler():
    opt = two_group_opt()
    sched = S.CosineAnnealingLR(opt.base_optimizer, T_max=10, eta_min=0.001)
    assert opt.set_lr_range(sched)[0] == (0.001, 0.1)


def test_set_lr_range_errors():
    opt = two_group_opt()
    with pytest.raises(TypeError, match="LambdaLR"):
        opt.set_lr_range(S.LambdaLR(opt, lambda step: 1.0))
    other = torch.optim.SGD([nn.Parameter(torch.ones(1))], lr=0.1)
    with pytest.raises(ValueError, match="does not drive this optimizer"):
        opt.set_lr_range(S.CosineAnnealingLR(other, T_max=3))
    with pytest.raises(ValueError, match="does not drive this optimizer"):
        opt.set_lr_range(object())


def test_lr_max_below_lr_min_at_step_time():
    opt = gsam(lr=0.1, rho=0.2, rho_min=0.0, lr_min=0.5)  # lr_max falls back to the current lr, 0.1
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="lr_max"):
        opt.first_step()
    assert opt._pending is None and torch.equal(p, torch.ones(3))


def test_rho_min_above_a_group_rho_is_rejected():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.ones(2))
    with pytest.raises(ValueError, match="Invalid rho_min value: 0.1"):
        flatminima.GSAM([{"params": [a]}, {"params": [b], "rho": 0.05}], torch.optim.SGD, lr=0.1, rho=0.2, rho_min=0.1)
    opt = flatminima.GSAM([a], torch.optim.SGD, lr=0.1, rho=0.2, rho_min=0.1)
    with pytest.raises(ValueError, match="Invalid rho_min value"):
        opt.add_param_group({"params": [b], "rho": 0.01})
