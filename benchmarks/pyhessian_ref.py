"""PyHessian 0.1 (``pip install pyhessian``) run on the same model and batch
as :mod:`flatminima.sharpness`, for the benchmark and the agreement tests.

PyHessian is used as published, with three adaptations that change none of
its numbers:

* it runs on a deep copy of the model: its constructor calls
  ``loss.backward(create_graph=True)``, which writes ``.grad`` (with a graph)
  into the model it is given;
* its ``density()`` calls ``torch.eig``, removed from PyTorch (it raises
  since 2.0); while it runs, ``torch.eig`` is replaced by ``torch.linalg.eigh``
  in the old return format (eigenvalues as an ``(m, 2)`` real/imaginary
  table, eigenvectors as columns): ``T`` is symmetric, so the two agree up to
  the order of the eigenpairs, which the density does not depend on;
* its random vectors come from the global RNG; each call seeds it inside
  ``torch.random.fork_rng()``, so the caller's RNG state is left alone.

Hessian-vector products are counted by wrapping PyHessian's
``hessian_vector_product`` (single batch) and ``dataloader_hv_product``.

:func:`density_generate` is PyHessian's Gaussian broadening from
``density_plot.py`` of its repository (not shipped in the pip package),
written out here with numpy as published.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def missing() -> str | None:
    """Why PyHessian cannot run here, or ``None`` when it can."""
    if importlib.util.find_spec("pyhessian") is None:
        return "pyhessian is not installed (pip install pyhessian, the dev extra)"
    return None


def _eig_shim(t: Tensor, eigenvectors: bool = False) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(t)
    return torch.stack([values, torch.zeros_like(values)], 1), vectors


@contextlib.contextmanager
def _patched(counter: list[int]) -> Iterator[None]:
    ph = importlib.import_module("pyhessian.hessian")  # (the package re-exports the class under the same name)

    hvp, loader_hvp = ph.hessian_vector_product, ph.hessian.dataloader_hv_product

    def counted_hvp(*a: Any, **k: Any) -> Any:
        counter[0] += 1
        return hvp(*a, **k)

    def counted_loader_hvp(self: Any, v: Any) -> Any:
        counter[0] += 1
        return loader_hvp(self, v)

    old_eig = getattr(torch, "eig", None)
    ph.hessian_vector_product = counted_hvp
    ph.hessian.dataloader_hv_product = counted_loader_hvp  # type: ignore[method-assign]
    torch.eig = _eig_shim  # type: ignore[attr-defined]
    try:
        yield
    finally:
        ph.hessian_vector_product = hvp
        ph.hessian.dataloader_hv_product = loader_hvp  # type: ignore[method-assign]
        if old_eig is None:
            del torch.eig  # type: ignore[attr-defined]
        else:
            torch.eig = old_eig  # type: ignore[attr-defined]


def _run(model: nn.Module, criterion: Callable[..., Tensor], batch: tuple[Tensor, Tensor], seed: int,
         call: Callable[[Any], Any]) -> tuple[Any, int]:
    import pyhessian

    counter = [0]
    copied = copy.deepcopy(model)
    cuda = next(copied.parameters()).device.type == "cuda"
    with torch.random.fork_rng(devices=[torch.cuda.current_device()] if cuda else []), _patched(counter):
        torch.manual_seed(seed)
        with warnings.catch_warnings():  # its loss.backward(create_graph=True) warns of a reference cycle
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            h = pyhessian.hessian(copied, criterion, data=batch, cuda=cuda)
        out = call(h)
    return out, counter[0]


def eigenvalues(model: nn.Module, criterion: Callable[..., Tensor], batch: tuple[Tensor, Tensor], *,
                seed: int = 0, max_iter: int = 100, tol: float = 1e-3, top_n: int = 1) -> tuple[list[float], int]:
    """PyHessian's ``eigenvalues(maxIter, tol, top_n)``: ``(eigenvalues, products)``."""
    (values, _), n = _run(model, criterion, batch, seed, lambda h: h.eigenvalues(maxIter=max_iter, tol=tol, top_n=top_n))
    return [float(v) for v in values], n


def trace(model: nn.Module, criterion: Callable[..., Tensor], batch: tuple[Tensor, Tensor], *,
          seed: int = 0, max_iter: int = 100, tol: float = 1e-3) -> tuple[list[float], int]:
    """PyHessian's ``trace(maxIter, tol)``: ``(samples, products)`` (the estimate is their mean)."""
    samples, n = _run(model, criterion, batch, seed, lambda h: h.trace(maxIter=max_iter, tol=tol))
    return [float(s) for s in samples], n


def density(model: nn.Module, criterion: Callable[..., Tensor], batch: tuple[Tensor, Tensor], *,
            seed: int = 0, iterations: int = 100, runs: int = 1) -> tuple[list[list[float]], list[list[float]], int]:
    """PyHessian's ``density(iter, n_v)``: ``(nodes, weights, products)``, one list per run."""
    (nodes, weights), n = _run(model, criterion, batch, seed, lambda h: h.density(iter=iterations, n_v=runs))
    return [[float(t) for t in r] for r in nodes], [[float(w) for w in r] for r in weights], n


def _gaussian(x: np.ndarray, x0: float, sigma_squared: float) -> np.ndarray:
    return np.exp(-((x0 - x) ** 2) / (2.0 * sigma_squared)) / np.sqrt(2 * np.pi * sigma_squared)


def density_generate(eigenvalues: list[list[float]], weights: list[list[float]], num_bins: int = 10000,
                     sigma_squared: float = 1e-5, overhead: float = 0.01) -> tuple[np.ndarray, np.ndarray]:
    """PyHessian's ``density_generate`` (``density_plot.py``): ``(density, grids)``."""
    ev = np.array(eigenvalues)
    w = np.array(weights)
    lambda_max = np.mean(np.max(ev, axis=1), axis=0) + overhead
    lambda_min = np.mean(np.min(ev, axis=1), axis=0) - overhead
    grids = np.linspace(lambda_min, lambda_max, num=num_bins)
    sigma = sigma_squared * max(1, (lambda_max - lambda_min))
    num_runs = ev.shape[0]
    density_output = np.zeros((num_runs, num_bins))
    for i in range(num_runs):
        for j in range(num_bins):
            density_output[i, j] = np.sum(_gaussian(ev[i, :], grids[j], sigma) * w[i, :])
    dens = np.mean(density_output, axis=0)
    normalization = np.sum(dens) * (grids[1] - grids[0])
    return dens / normalization, grids
