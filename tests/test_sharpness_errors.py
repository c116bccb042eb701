"""Bad input fails early with ValueError/TypeError naming the bad value."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from sharpness_helpers import data, net

import flatminima.sharpness as S

M = net()
D = data(1)
P = list(M.parameters())

CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("k=0", lambda: S.hessian_eigenvalues(M, D, k=0), ValueError, "Invalid k value: 0"),
    ("k too big", lambda: S.hessian_eigenvalues(M, D, k=10**6), ValueError, "1000000"),
    ("k float", lambda: S.hessian_eigenvalues(M, D, k=1.5), TypeError, "1.5"),
    ("tol<0", lambda: S.lambda_max(M, D, tol=-1.0), ValueError, "Invalid tol value: -1.0"),
    ("max_iter=0", lambda: S.lambda_max(M, D, max_iter=0), ValueError, "Invalid max_iter value: 0"),
    ("seed str", lambda: S.lambda_max(M, D, seed="a"), TypeError, "'a'"),
    ("min>max", lambda: S.hessian_trace(M, D, min_samples=20, max_samples=10), ValueError, "min_samples value: 20"),
    ("max_samples=0", lambda: S.hessian_trace(M, D, max_samples=0), ValueError, "max_samples value: 0"),
    ("rho<0 gap", lambda: S.one_step_gap(M, D, rho=-0.1), ValueError, "Invalid rho value: -0.1"),
    ("rho<0 worst", lambda: S.worst_case_sharpness(M, D, -1.0), ValueError, "Invalid rho value: -1.0"),
    ("rho nan", lambda: S.average_case_sharpness(M, D, float("nan")), ValueError, "Invalid rho value: nan"),
    ("rho str", lambda: S.m_sharpness(M, D, 4, rho="big"), TypeError, "'big'"),
    ("m=0", lambda: S.m_sharpness(M, D, m=0), ValueError, "Invalid m value: 0"),
    ("p=3", lambda: S.worst_case_sharpness(M, D, 0.1, p=3), ValueError, "Invalid p value: 3"),
    ("p=one", lambda: S.worst_case_sharpness(M, D, 0.1, p="one"), ValueError, "'one'"),
    ("steps=0", lambda: S.worst_case_sharpness(M, D, 0.1, steps=0), ValueError, "Invalid steps value: 0"),
    ("eta<0", lambda: S.worst_case_sharpness(M, D, 0.1, eta=-0.5), ValueError, "Invalid eta value: -0.5"),
    ("adaptive int", lambda: S.average_case_sharpness(M, D, 0.1, adaptive=1), TypeError, "adaptive"),
    ("samples=0", lambda: S.average_case_sharpness(M, D, 0.1, samples=0), ValueError, "Invalid samples value: 0"),
    ("empty data", lambda: S.lambda_max(M, []), ValueError, "data is empty: got 0 batches"),
    ("empty batch", lambda: S.lambda_max(M, [(torch.zeros(0, 5), torch.zeros(0))]), ValueError, "data[0] is an empty batch"),
    ("batch triple", lambda: S.lambda_max(M, [(1, 2, 3)]), TypeError, "data[0] must be an (x, y) pair, got tuple of length 3"),
    ("data int", lambda: S.lambda_max(M, 5), TypeError, "got int"),
    ("model int", lambda: S.lambda_max(3, D), TypeError, "got int"),
    ("tensors + batches", lambda: S.lambda_max(P, D), TypeError, "needs model to be a torch.nn.Module"),
    ("no grad tensor", lambda: S.lambda_max([torch.zeros(2)], lambda: torch.zeros(())), ValueError, "model[0] (shape (2,)) does not require grad"),
    ("frozen model", lambda: S.lambda_max(net().requires_grad_(False), D), ValueError, "no trainable parameters"),
    ("loss vector", lambda: S.lambda_max(P, lambda: P[0].sum(0)), TypeError, "scalar tensor"),
    ("loss_fn int", lambda: S.lambda_max(M, D, loss_fn=3), TypeError, "loss_fn must be callable, got int"),
    ("m with callable", lambda: S.m_sharpness(P, lambda: P[0].sum(), m=2), TypeError, "m-sized chunks"),
    ("hvp shape", lambda: S.hvp(M, D, [torch.zeros(3)] * len(P)), ValueError, "v[0] has shape (3,)"),
    ("alphas empty", lambda: S.slice_1d(M, D, alphas=[]), ValueError, "alphas is empty"),
    ("alphas inf", lambda: S.slice_1d(M, D, alphas=[0.0, float("inf")]), ValueError, "Invalid alphas value: inf"),
    ("betas str", lambda: S.slice_2d(M, D, betas="ab"), TypeError, "betas must be a sequence of numbers"),
    ("direction len", lambda: S.slice_1d(M, D, direction=P[:1]), ValueError, "direction has 1 tensors"),
    ("normalization", lambda: S.random_direction(M, normalization="unit"), ValueError, "Invalid normalization value: 'unit'"),
    ("bias_bn", lambda: S.slice_1d(M, D, bias_bn="drop"), ValueError, "Invalid bias_bn value: 'drop'"),
    ("interp missing", lambda: S.interpolate(M, {"0.weight": P[0]}, D), ValueError, "model_b has no parameter '0.bias'"),
    ("interp shape", lambda: S.interpolate(M, [torch.zeros(1)] * len(P), D), ValueError, "model_b[0] has shape (1,)"),
    ("measure", lambda: S.report(M, D, measures=["sharpest"]), ValueError, "Invalid measure value: 'sharpest'"),
    ("report m", lambda: S.report(M, D, measures=["m_sharpness"]), ValueError, "Invalid m value: None"),
    ("progress str", lambda: S.hessian_trace(M, D, progress="yes"), TypeError, "progress must be"),
    ("method", lambda: S.lambda_max(M, D, method="arnoldi"), ValueError, "Invalid method value: 'arnoldi'"),
    ("lanczos k>max_iter", lambda: S.hessian_eigenvalues(M, D, k=5, max_iter=3), ValueError,
     "Invalid max_iter value: 3 (Lanczos needs at least k = 5 steps"),
    ("trace method", lambda: S.hessian_trace(M, D, method="hutch"), ValueError, "Invalid method value: 'hutch'"),
    ("sketch=0", lambda: S.hessian_trace(M, D, sketch=0), ValueError, "Invalid sketch value: 0"),
    ("target_stderr<0", lambda: S.hessian_trace(M, D, target_stderr=-1.0), ValueError, "Invalid target_stderr value: -1.0"),
    ("report method", lambda: S.report(M, D, method="qr"), ValueError, "Invalid method value: 'qr'"),
    ("report trace_method", lambda: S.report(M, D, trace_method="exact"), ValueError, "Invalid trace_method value: 'exact'"),
    ("iterations=0", lambda: S.hessian_density(M, D, iterations=0), ValueError, "Invalid iterations value: 0"),
    ("runs float", lambda: S.hessian_density(M, D, runs=2.0), TypeError, "2.0"),
    ("probe", lambda: S.hessian_density(M, D, probe="uniform"), ValueError, "Invalid probe value: 'uniform'"),
    ("num_bins=1", lambda: S.broadened_density([[1.0]], [[1.0]], num_bins=1), ValueError, "Invalid num_bins value: 1"),
    ("sigma=0", lambda: S.broadened_density([[1.0]], [[1.0]], sigma_squared=0.0), ValueError,
     "Invalid sigma_squared value: 0.0"),
    ("ragged runs", lambda: S.broadened_density([[1.0, 2.0]], [[1.0]]), ValueError, "equal-length"),
    ("moment k<0", lambda: S.hessian_density(M, D, iterations=2).moment(-1), ValueError, "Invalid k value: -1"),
    ("points=0", lambda: S.linspace(0, 1, 0), ValueError, "Invalid points value: 0"),
]


@pytest.mark.parametrize("name,call,exc,text", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name: str, call: Callable[[], Any], exc: type[Exception], text: str) -> None:
    with pytest.raises(exc) as info:
        call()
    assert text in str(info.value)
