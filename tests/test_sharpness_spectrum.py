"""Lanczos eigenvalues, the Hutch++ trace and the SLQ spectral density, on
quadratics ``0.5 w^T A w`` whose Hessian ``A = Q diag(lambda) Q^T`` (float64)
has a spectrum known exactly; the density also against PyHessian 0.1 on the
same model and probes."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from sharpness_helpers import quadratic, spectrum_matrix
from torch import nn

import flatminima.sharpness as S

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import pyhessian_ref as ref


def small_gap(n: int = 120) -> list[float]:
    """lambda_2 / lambda_1 = 0.9, then a bulk in (0, 1]: power iteration's hard case."""
    return [10.0, 9.0, 8.5] + [1.0 - i / n for i in range(n - 3)]


def decaying(n: int = 100) -> list[float]:
    """lambda_i = 50 / i: a few outliers carry most of sum_ij A_ij^2, as in a network's Hessian."""
    return [50.0 / (i + 1) for i in range(n)]


def test_lanczos_top_k_tight_with_three_times_fewer_products_than_power() -> None:
    spec = small_gap()
    a = spectrum_matrix(spec, seed=0)
    w, loss = quadratic(a)
    exact = sorted(spec, reverse=True)
    for k in (1, 3):
        lz = S.hessian_eigenvalues([w], loss, k=k, tol=1e-10, max_iter=120)
        pw = S.hessian_eigenvalues([w], loss, k=k, method="power", tol=1e-10, max_iter=5000)
        assert lz.method == "lanczos" and pw.method == "power"
        assert lz.converged == [True] * k and pw.converged == [True] * k
        for got, want in zip(lz.eigenvalues, exact):
            assert abs(got - want) / want < 1e-12  # the residual rule's error is ~ residual^2 / gap
        for got, want in zip(pw.eigenvalues, exact):
            assert abs(got - want) / want < 1e-8
        assert lz.iterations == [lz.n_products] * k and pw.n_products == sum(pw.iterations)
        assert 3 * lz.n_products <= pw.n_products, (k, lz.n_products, pw.n_products)
        if k == 1:
            assert S.lambda_max([w], loss, tol=1e-10, max_iter=120) == lz.eigenvalues[0]


def test_lanczos_default_tol_bounds_the_error_and_eigenvectors() -> None:
    spec = small_gap()
    a = spectrum_matrix(spec, seed=3)
    w, loss = quadratic(a)
    res = S.hessian_eigenvalues([w], loss, k=2, return_eigenvectors=True)
    assert res.converged == [True, True]
    for got, want in zip(res.eigenvalues, (10.0, 9.0)):
        assert abs(got - want) / want < 1e-3  # tol bounds the relative error
    vecs = torch.stack([v[0] for v in res.eigenvectors])
    assert torch.allclose(vecs @ vecs.T, torch.eye(2, dtype=torch.float64), atol=1e-10)
    for v, lam in zip(vecs, res.eigenvalues):
        assert torch.linalg.vector_norm(a @ v - lam * v) <= 1e-3 * lam  # the residual rule itself


def test_lanczos_in_few_dimensions_and_on_a_zero_hessian() -> None:
    a = torch.diag(torch.tensor([3.0, -7.0, 1.0], dtype=torch.float64))
    w, loss = quadratic(a)
    res = S.hessian_eigenvalues([w], loss, k=3, max_iter=100)
    assert res.eigenvalues == pytest.approx([-7.0, 3.0, 1.0], abs=1e-12)  # largest magnitude first
    assert res.n_products == 3  # never more steps than dimensions
    z = torch.ones(4, dtype=torch.float64, requires_grad=True)
    res = S.hessian_eigenvalues([z], lambda: z.sum(), k=2)  # H = 0: breakdown, restart, exact zeros
    assert res.eigenvalues == [0.0, 0.0] and res.converged == [True, True]


def test_hutch_plus_plus_is_exact_when_the_rank_fits_the_sketch() -> None:
    a = spectrum_matrix([40.0, -3.0, 2.5, 1.0] + [0.0] * 36, seed=2)
    w, loss = quadratic(a)
    res = S.hessian_trace([w], loss, sketch=6)
    assert res.method == "hutch++" and res.sketch_rank == 4  # rank(H S) = 4 < 6 columns: two dropped
    assert abs(res.trace - 40.5) < 1e-10 and abs(res.low_rank - 40.5) < 1e-10
    assert res.stderr < 1e-10 and res.n_products == 6 + 4 + res.n_samples
    small = torch.diag(torch.tensor([1.0, 4.0], dtype=torch.float64))
    v, small_loss = quadratic(small)
    res = S.hessian_trace([v], small_loss)  # sketch 10 cut to n = 2: Q spans everything
    assert abs(res.trace - 5.0) < 1e-12 and res.n_samples == 0 and res.n_products == 4


def test_hutch_plus_plus_unbiased_and_smaller_error_than_hutchinson_at_equal_products() -> None:
    spec = decaying()
    a = spectrum_matrix(spec, seed=1)
    w, loss = quadratic(a)
    exact = sum(spec)
    seeds = range(40)
    pp = [S.hessian_trace([w], loss, sketch=10, tol=0.0, min_samples=10, max_samples=10, seed=s) for s in seeds]
    hu = [S.hessian_trace([w], loss, method="hutchinson", tol=0.0, min_samples=30, max_samples=30, seed=s)
          for s in seeds]
    assert {r.n_products for r in pp} == {30} and {r.n_products for r in hu} == {30}
    err_pp = [r.trace - exact for r in pp]
    err_hu = [r.trace - exact for r in hu]
    mse_pp = statistics.fmean(e * e for e in err_pp)
    mse_hu = statistics.fmean(e * e for e in err_hu)
    assert mse_pp < 0.4 * mse_hu, (mse_pp, mse_hu)
    for errs in (err_pp, err_hu):  # unbiased: the mean error within 4 standard errors of 0
        assert abs(statistics.fmean(errs)) < 4 * statistics.stdev(errs) / math.sqrt(len(errs))
    # the reported standard errors describe the spread of the estimates
    for errs, runs in ((err_pp, pp), (err_hu, hu)):
        ratio = statistics.fmean(r.stderr**2 for r in runs) / statistics.fmean(e * e for e in errs)
        assert 0.5 < ratio < 2.0, ratio


def test_target_stderr_stops_at_the_first_sample_that_meets_it() -> None:
    a = spectrum_matrix(decaying(60), seed=4)
    w, loss = quadratic(a)
    for method in ("hutch++", "hutchinson"):
        free = S.hessian_trace([w], loss, method=method, tol=0.0, max_samples=300)
        target = 0.5 * statistics.stdev(free.samples[:10]) / math.sqrt(10)
        res = S.hessian_trace([w], loss, method=method, tol=0.0, max_samples=300, target_stderr=target)
        assert res.converged and res.stderr <= target
        k = res.n_samples
        assert res.samples == free.samples[:k]  # the same draws, stopped earlier
        assert statistics.stdev(free.samples[: k - 1]) / math.sqrt(k - 1) > target


def test_slq_moments_are_exact_for_a_diagonal_hessian_and_nodes_are_eigenvalues() -> None:
    lam = [5.0, 3.0, 2.0, 0.5, -1.0, -4.0]
    a = torch.diag(torch.tensor(lam, dtype=torch.float64))
    w, loss = quadratic(a)
    # Rademacher probes: z^T A^k z = tr(A^k) for diagonal A, so each run's moments are exact
    sd = S.hessian_density([w], loss, iterations=3, runs=2)
    n = len(lam)
    assert sd.n_products == 6 and sd.dimension == n and sd.runs == 2
    assert all(abs(sum(ws) - 1.0) < 1e-12 for ws in sd.weights)
    assert abs(sd.moment(1) - sum(lam) / n) < 1e-12
    assert abs(sd.moment(2) - sum(x * x for x in lam) / n) < 1e-12
    full = S.hessian_density([w], loss, iterations=100)  # n steps: the quadrature is the spectrum
    assert full.n_products == n
    assert full.nodes[0] == pytest.approx(sorted(lam), abs=1e-12)
    assert full.weights[0] == pytest.approx([1 / n] * n, abs=1e-12)


@pytest.mark.parametrize("probe", ["rademacher", "gaussian"])
def test_slq_first_two_moments_match_trace_and_squared_sum(probe: str) -> None:
    # SLQ's k-th moment is the Hutchinson estimate of tr(A^k) / n with its probes (exact for
    # k <= 2m - 1), so its standard deviation over R runs is sqrt(2 sum_{i!=j} (A^k)_ij^2 / R) / n
    # for Rademacher probes; Gaussian probes normalised to unit length add the diagonal:
    # sqrt(2 (sum_ij (A^k)_ij^2 - (tr A^k)^2 / n) / (n + 2) / R) / n * sqrt(n) ~ the same order.
    # The tolerance is 5 of those standard deviations (a false failure has odds < 1e-6).
    spec = decaying(80)
    a = spectrum_matrix(spec, seed=6)
    w, loss = quadratic(a)
    n, runs = len(spec), 8
    sd = S.hessian_density([w], loss, iterations=15, runs=runs, probe=probe, seed=1)
    assert sd.n_products == 15 * runs
    for k, exact in ((1, sum(spec) / n), (2, sum(x * x for x in spec) / n)):
        ak = torch.linalg.matrix_power(a, k)
        off = (ak.pow(2).sum() - ak.diag().pow(2).sum()).item()
        full = (ak.pow(2).sum() - torch.trace(ak) ** 2 / n).item()
        sigma = math.sqrt(2 * (off if probe == "rademacher" else full * n / (n + 2)) / runs) / n
        assert abs(sd.moment(k) - exact) < 5 * sigma, (k, sd.moment(k), exact, sigma)


def test_broadening_is_pyhessians_density_generate() -> None:
    g = torch.Generator().manual_seed(0)
    nodes = [sorted(torch.randn(12, generator=g, dtype=torch.float64).mul(3).tolist()) for _ in range(3)]
    weights = [torch.rand(12, generator=g, dtype=torch.float64).softmax(0).tolist() for _ in range(3)]
    grid, dens = S.broadened_density(nodes, weights, num_bins=2000, sigma_squared=1e-3)
    want, want_grid = ref.density_generate(nodes, weights, num_bins=2000, sigma_squared=1e-3)
    assert grid == pytest.approx(want_grid.tolist(), rel=1e-13, abs=1e-13)
    assert dens == pytest.approx(want.tolist(), rel=1e-9, abs=1e-12)


class Quadratic(nn.Module):
    """``0.5 w^T A w`` as a module PyHessian can drive (it needs ``criterion(model(x), y)``)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=torch.Generator().manual_seed(1), dtype=a.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.w @ self.a @ self.w + 0.0 * x.sum()


def _identity_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return out


@pytest.mark.skipif(ref.missing() is not None, reason=str(ref.missing()))
def test_density_matches_pyhessian_on_the_same_model_and_probes() -> None:
    a = spectrum_matrix(decaying(60), seed=7)
    model = Quadratic(a)
    batch = (torch.zeros(1, dtype=torch.float64), torch.zeros(1))
    # PyHessian draws its Rademacher probes from the global RNG, seeded here with the same seed as
    # ours: the same bits, parameter after parameter, so both run Lanczos from the same vectors
    ph_nodes, ph_weights, ph_products = ref.density(model, _identity_loss, batch, seed=3, iterations=20, runs=2)
    sd = S.hessian_density(model, [batch], loss_fn=_identity_loss, iterations=20, runs=2, seed=3)
    assert sd.n_products == ph_products == 40
    for ours, theirs in zip(sd.nodes, ph_nodes):  # PyHessian builds T in float32
        assert ours == pytest.approx(sorted(theirs), rel=1e-5, abs=1e-5)
    grid, dens = sd.density(sigma_squared=1e-3)
    want, want_grid = ref.density_generate(ph_nodes, ph_weights, sigma_squared=1e-3)
    dx = grid[1] - grid[0]
    l1 = sum(abs(x - y) for x, y in zip(dens, want.tolist())) * dx  # both integrate to 1
    assert l1 < 1e-3, l1
    assert grid == pytest.approx(want_grid.tolist(), abs=1e-4)
