"""Every measure leaves the model exactly as it was and repeats itself for a seed."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from sharpness_helpers import data, net
from torch import nn

import flatminima.sharpness as S


def _other() -> nn.Module:
    m = net(seed=7, batchnorm=True, dropout=True)
    m.train()
    m(torch.randn(16, 5, dtype=torch.float64))  # different running statistics
    return m


MEASURES: dict[str, Callable[[nn.Module, list], Any]] = {
    "hvp": lambda m, d: S.hvp(m, d, [torch.ones_like(p) for p in m.parameters()]),
    "lambda_max": lambda m, d: S.lambda_max(m, d, max_iter=15),
    "top_k": lambda m, d: S.hessian_eigenvalues(m, d, k=2, max_iter=10, return_eigenvectors=True),
    "lambda_max_power": lambda m, d: S.lambda_max(m, d, method="power", max_iter=15),
    "top_k_power": lambda m, d: S.hessian_eigenvalues(m, d, k=2, method="power", max_iter=10, return_eigenvectors=True),
    "trace": lambda m, d: S.hessian_trace(m, d, max_samples=12),
    "trace_hutchinson": lambda m, d: S.hessian_trace(m, d, method="hutchinson", max_samples=12),
    "density": lambda m, d: S.hessian_density(m, d, iterations=10, runs=2),
    "gap": lambda m, d: S.one_step_gap(m, d, rho=0.1),
    "m_sharpness": lambda m, d: S.m_sharpness(m, d, m=5, rho=0.1),
    "worst_case": lambda m, d: S.worst_case_sharpness(m, d, 0.2, steps=4, return_deltas=True),
    "worst_case_inf": lambda m, d: S.worst_case_sharpness(m, d, 0.2, p="inf", adaptive=False, steps=3),
    "average_case": lambda m, d: S.average_case_sharpness(m, d, 0.1, samples=4, seed=3),
    "interpolate": lambda m, d: S.interpolate(m, _other(), d, [-0.5, 0.0, 0.5, 1.0]),
    "slice_1d": lambda m, d: S.slice_1d(m, d, alphas=[-1.0, 0.0, 0.3], seed=2),
    "slice_2d": lambda m, d: S.slice_2d(m, d, alphas=[-1.0, 0.0], betas=[0.0, 0.5], seed=2),
    "report": lambda m, d: S.report(m, d, measures=S.MEASURES, m=6, max_iter=10, max_samples=10,
                                    options={"average_case": {"samples": 2}, "worst_case": {"steps": 2}}),
}


def _state(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if hasattr(a, "__dataclass_fields__"):
        return _same(vars(a), vars(b))
    return a == b or (a != a and b != b)  # NaN == NaN here


@pytest.mark.parametrize("name", list(MEASURES))
def test_weights_buffers_grads_and_modes_are_left_alone_and_results_repeat(name: str) -> None:
    model, batches = net(batchnorm=True, dropout=True), data(2)
    model.train()
    model(torch.randn(16, 5, dtype=torch.float64))  # non-trivial running statistics
    model[-1].train(False)  # a mixed set of training flags must come back as it was
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    before = _state(model)
    flags = [m.training for m in model.modules()]
    first = MEASURES[name](model, batches)
    after = _state(model)
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(before, after)), "weights/buffers changed"
    assert all(torch.equal(p.grad, torch.full_like(p, 0.25)) for p in model.parameters()), ".grad changed"
    assert [m.training for m in model.modules()] == flags
    second = MEASURES[name](model, batches)
    assert _same(first, second), "not deterministic"


def test_measures_do_not_depend_on_the_global_rng() -> None:
    model, batches = net(), data(1)
    torch.manual_seed(1)
    a = (S.lambda_max(model, batches), S.hessian_trace(model, batches).trace, S.slice_1d(model, batches).losses)
    torch.manual_seed(2)
    torch.randn(100)
    b = (S.lambda_max(model, batches), S.hessian_trace(model, batches).trace, S.slice_1d(model, batches).losses)
    assert a == b
    assert S.lambda_max(model, batches, seed=1, tol=0.0, max_iter=5) != S.lambda_max(model, batches, seed=2, tol=0.0, max_iter=5)


def test_float32_model_weights_come_back_bit_for_bit() -> None:
    model = net().float()
    batches = [(x.float(), y) for x, y in data(2)]
    before = _state(model)
    S.worst_case_sharpness(model, batches, 0.3, steps=3)
    S.average_case_sharpness(model, batches, 0.3, samples=2)
    S.slice_2d(model, batches, alphas=[0.37, 0.0], betas=[-0.11])
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model)))


def test_core_and_cli_import_without_matplotlib() -> None:
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"
        "import flatminima.sharpness, flatminima.sharpness.cli\n"
        "assert 'flatminima.sharpness.plot' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_progress_callback_counts_up_to_total() -> None:
    model, batches = net(), data(1)
    calls: list[tuple[int, int, str]] = []
    S.hessian_trace(model, batches, method="hutchinson", max_samples=15, progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls and all(t == 15 for _, t, _ in calls)
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls) and calls[-1][0] == 15
    calls.clear()  # Hutch++: the sketch (10) and tr(Q^T H Q) (10) come first
    S.hessian_trace(model, batches, max_samples=15, progress=lambda d, t, m: calls.append((d, t, m)))
    assert calls and all(t == 35 for _, t, _ in calls) and calls[-1][0] == 35
    assert [d for d, _, _ in calls] == sorted(d for d, _, _ in calls)
    calls.clear()
    S.hessian_density(model, batches, iterations=12, runs=2, progress=lambda d, t, m: calls.append((d, t, m)))
    assert [d for d, _, _ in calls] == list(range(1, 25)) and all(t == 24 for _, t, _ in calls)
    seen: list[int] = []
    S.slice_1d(model, batches, alphas=[0.0, 0.5, 1.0], progress=lambda d, t, m: seen.append(d))
    assert seen == [1, 2, 3]


def test_progress_true_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    model, batches = net(), data(1)
    S.slice_1d(model, batches, alphas=[0.0, 0.5], progress=True)  # tqdm, rich or stderr lines: must not fail


def test_measures_work_inside_no_grad() -> None:
    model, batches = net(), data(1)
    expected = (S.lambda_max(model, batches), S.one_step_gap(model, batches), S.report(model, batches)["trace"])
    with torch.no_grad():
        got = (S.lambda_max(model, batches), S.one_step_gap(model, batches), S.report(model, batches)["trace"])
    assert got == expected
