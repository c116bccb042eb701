"""Hessian-vector products, top eigenvalues and the Hutchinson trace.

Quadratics ``0.5 w^T A w`` have the known Hessian ``A``; see
``sharpness_helpers.gapped_spectrum`` for why their spectra have a clear gap.
"""

from __future__ import annotations

import torch
from sharpness_helpers import data, gapped_spectrum, net, quadratic, spectrum_matrix
from torch import nn

import flatminima.sharpness as S


def test_lambda_max_matches_eigvalsh_with_defaults() -> None:
    for seed in range(3):
        a = spectrum_matrix(gapped_spectrum(), seed=seed)
        w, loss = quadratic(a, seed=seed)
        expected = torch.linalg.eigvalsh(a).max().item()
        res = S.hessian_eigenvalues([w], loss, seed=seed)
        assert res.converged == [True]
        assert abs(res.eigenvalues[0] - expected) / expected < 1e-4
        assert S.lambda_max([w], loss, seed=seed) == res.eigenvalues[0]


def test_top_k_matches_eigvalsh_and_eigenvectors() -> None:
    a = spectrum_matrix(gapped_spectrum(), seed=5)
    w, loss = quadratic(a)
    expected = torch.linalg.eigvalsh(a).flip(0)[:3].tolist()
    res = S.hessian_eigenvalues([w], loss, k=3, return_eigenvectors=True)
    for got, want in zip(res.eigenvalues, expected):
        assert abs(got - want) / want < 1e-4
    vecs = [v[0] for v in res.eigenvectors]
    for v, lam in zip(vecs, res.eigenvalues):
        assert abs(v.norm().item() - 1.0) < 1e-12
        assert torch.linalg.vector_norm(a @ v - lam * v) / lam < 1e-2  # eigenvector angle ~ sqrt(eigenvalue error)
    gram = torch.stack(vecs) @ torch.stack(vecs).T
    assert torch.allclose(gram, torch.eye(3, dtype=torch.float64), atol=1e-10)


def test_tighter_tol_gives_more_digits() -> None:
    a = spectrum_matrix([10.0, 9.0] + [1.0] * 20, seed=2)  # ratio 0.9: a hard case for the default rule
    w, loss = quadratic(a)
    loose = S.lambda_max([w], loss)
    tight = S.lambda_max([w], loss, tol=1e-12, max_iter=2000)
    assert abs(tight - 10.0) < 1e-8
    assert abs(loose - 10.0) >= abs(tight - 10.0)


def test_hutchinson_trace_within_two_percent() -> None:
    # z^T A z has variance 2 sum_{i!=j} A_ij^2: a spectrum in [1, 2] keeps the
    # off-diagonal mass small, so a few hundred samples reach 2%.
    n = 50
    a = spectrum_matrix([1.0 + i / n for i in range(n)], seed=4)
    w, loss = quadratic(a)
    exact = torch.trace(a).item()
    res = S.hessian_trace([w], loss, method="hutchinson", tol=0.0, max_samples=400, seed=0)
    assert res.n_samples == 400 and not res.converged
    assert abs(res.trace - exact) / exact < 0.02
    assert abs(res.trace - exact) < 4 * res.stderr
    var = 2 * (a.pow(2).sum() - a.diag().pow(2).sum()).item()
    assert 0.5 < res.stderr / (var / 400) ** 0.5 < 1.5


def test_trace_stopping_rule_and_samples() -> None:
    a = spectrum_matrix([1.0 + i / 30 for i in range(30)], seed=1)
    w, loss = quadratic(a)
    res = S.hessian_trace([w], loss, method="hutchinson", min_samples=5, max_samples=500)
    assert 5 <= res.n_samples <= 500
    assert res.converged == (res.n_samples < 500)
    assert abs(res.trace - sum(res.samples) / res.n_samples) < 1e-9
    assert S.hessian_trace([w], loss, method="hutchinson", min_samples=3, max_samples=3).n_samples == 3


def _flat_grad(model: nn.Module, batches: list) -> torch.Tensor:
    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()
    loss = sum(len(y) * nn.functional.cross_entropy(model(x), y) for x, y in batches) / sum(len(y) for _, y in batches)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])


def test_hvp_matches_finite_differences_of_gradients() -> None:
    model, batches = net(), data()
    params = list(model.parameters())
    g = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]
    hv = torch.cat([t.reshape(-1) for t in S.hvp(model, batches, v)])
    h = 1e-5
    w0 = [p.detach().clone() for p in params]
    grads = []
    for sign in (1, -1):
        with torch.no_grad():
            for p, w, d in zip(params, w0, v):
                p.copy_(w + sign * h * d)
        grads.append(_flat_grad(model, batches))
    with torch.no_grad():
        for p, w in zip(params, w0):
            p.copy_(w)
    fd = (grads[0] - grads[1]) / (2 * h)
    assert torch.allclose(hv, fd, rtol=1e-6, atol=1e-8)


def test_hvp_columns_give_the_full_hessian() -> None:
    model, batches = net(), data(1)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    x, y = batches[0]

    def f(*flat: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model.eval(), dict(zip(names, flat)), (x,))
        return nn.functional.cross_entropy(out, y)

    blocks = torch.autograd.functional.hessian(f, tuple(p.detach() for p in params))
    sizes = [p.numel() for p in params]
    full = torch.cat([torch.cat([blocks[i][j].reshape(sizes[i], sizes[j]) for j in range(len(params))], 1)
                      for i in range(len(params))])
    n = sum(sizes)
    cols = []
    for k in range(0, n, 7):  # every 7th column keeps the test fast
        e = torch.zeros(n, dtype=torch.float64)
        e[k] = 1.0
        v = list(torch.split(e, sizes))
        v = [t.reshape(p.shape) for t, p in zip(v, params)]
        cols.append((k, torch.cat([t.reshape(-1) for t in S.hvp(model, batches, v)])))
    for k, col in cols:
        assert torch.allclose(col, full[:, k], rtol=1e-10, atol=1e-12)


def test_several_batches_equal_one_concatenated_batch() -> None:
    model, batches = net(), data(3, size=8)
    whole = [(torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))]
    v = [torch.ones_like(p) for p in model.parameters()]
    a = S.hvp(model, batches, v)
    b = S.hvp(model, whole, v)
    for s, t in zip(a, b):
        assert torch.allclose(s, t, rtol=1e-10, atol=1e-12)
    uneven = [(whole[0][0][:5], whole[0][1][:5]), (whole[0][0][5:], whole[0][1][5:])]
    for s, t in zip(S.hvp(model, uneven, v), b):
        assert torch.allclose(s, t, rtol=1e-10, atol=1e-12)


def test_cached_graph_gives_the_same_numbers() -> None:
    model, batches = net(), data(1)
    a = S.hessian_eigenvalues(model, batches, k=2, cache_graph=True)
    b = S.hessian_eigenvalues(model, batches, k=2, cache_graph=False)
    for s, t in zip(a.eigenvalues, b.eigenvalues):
        assert abs(s - t) <= 1e-12 * abs(t)
    assert a.iterations == b.iterations
    ta = S.hessian_trace(model, batches, cache_graph=True)
    tb = S.hessian_trace(model, batches, cache_graph=False)
    assert abs(ta.trace - tb.trace) <= 1e-12 * abs(tb.trace)


def test_frozen_and_unused_parameters() -> None:
    class WithUnused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net()
            self.unused = nn.Linear(2, 2).double()  # never called in forward

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model, batches = WithUnused(), data(1)
    model.net[0].weight.requires_grad_(False)
    v = [torch.ones_like(p) for p in model.parameters() if p.requires_grad]
    hv = S.hvp(model, batches, v)
    assert len(hv) == len(v) and all(t.shape == s.shape for t, s in zip(hv, v))
    assert torch.count_nonzero(hv[-1]) == 0 and torch.count_nonzero(hv[-2]) == 0
    # linear in w: the Hessian is zero
    w = torch.ones(3, dtype=torch.float64, requires_grad=True)
    assert S.lambda_max([w], lambda: w.sum()) == 0.0


def test_attention_double_backward() -> None:
    """Fused attention kernels have no double backward; the products route
    scaled_dot_product_attention to the math kernel."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(8 * 4, 3))
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 4, 8, generator=g), torch.randint(0, 3, (6,), generator=g))]
    lam = S.lambda_max(model, batches, max_iter=20)
    tr = S.hessian_trace(model, batches, max_samples=10)
    assert torch.isfinite(torch.tensor([lam, tr.trace])).all() and lam > 0
