"""Hessian-vector products ``Hv`` of a fixed objective.

``Hv = grad_w < grad_w L(w), v >`` (Pearlmutter's trick by double backward):
one backward with ``create_graph=True`` gives ``g = grad L`` as a function of
``w``; differentiating ``<g, v>`` gives ``Hv`` exactly (to rounding), for
about the cost of two to three forward-backward passes and without forming
``H``. Over several batches, ``Hv = sum_b (n_b / N) H_b v`` batch by batch, so
memory stays that of one batch.

With one term (one batch, or a loss callable) the graph of ``g`` is kept
between products (``cache_graph``), which saves its forward and first
backward on every product after the first, as PyHessian does for a single
batch. Use :class:`HessianOperator` as a context manager (or call
:meth:`~HessianOperator.close`) to free that graph.

The model runs in eval mode for the products (see :mod:`.objective`); the
attention kernels are routed to their math backend, whose backward is
differentiable twice (see :func:`~.objective.twice_differentiable`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import _vectors as V
from .objective import DataLike, LossFn, ModelLike, Objective, twice_differentiable


class HessianOperator:
    """The linear map ``v -> Hv`` of ``L`` at the current weights.

    Args:
        objective: the fixed objective (see :class:`~.objective.Objective`).
        cache_graph: keep the graph of ``grad L`` between products. ``None``
            (default): only when ``L`` is a single term (one batch or a loss
            callable); with several batches caching would hold every batch's
            graph at once.

    Attributes:
        n_products: how many products have been computed.

    The caller keeps the module in eval mode and the weights fixed while the
    operator lives (the measures do).
    """

    def __init__(self, objective: Objective, cache_graph: bool | None = None) -> None:
        self.objective = objective
        self.cache_graph = objective.n_terms == 1 if cache_graph is None else bool(cache_graph)
        self._graph: list[tuple[Tensor, ...]] | None = None
        self.n_products = 0

    @property
    def params(self) -> list[Tensor]:
        return self.objective.params

    def _grads(self, i: int) -> tuple[Tensor, ...]:
        with torch.enable_grad(), twice_differentiable():
            term = self.objective.term(i)
            return torch.autograd.grad(term, self.params, create_graph=True, allow_unused=True, materialize_grads=True)

    def _product(self, grads: Sequence[Tensor], v: Sequence[Tensor], retain: bool) -> V.Vector:
        with torch.enable_grad():
            terms = [(g * vi).sum() for g, vi in zip(grads, v) if g.requires_grad]
            if not terms:  # L is linear in w: H = 0
                return V.zeros_like(self.params)
            inner = terms[0]
            for t in terms[1:]:  # (not torch.stack: parameters may differ in dtype)
                inner = inner + t
            hv = torch.autograd.grad(inner, self.params, retain_graph=retain, allow_unused=True, materialize_grads=True)
        return [h.detach() for h in hv]

    def __call__(self, v: Sequence[Tensor]) -> V.Vector:
        """``Hv`` for ``v`` a list of tensors shaped like the parameters."""
        if len(v) != len(self.params):
            raise ValueError(f"v has {len(v)} tensors, the model has {len(self.params)} trainable parameters")
        v = [vi.detach() for vi in v]
        self.n_products += 1
        if self.cache_graph:
            if self._graph is None:
                self._graph = [self._grads(i) for i in range(self.objective.n_terms)]
            out: V.Vector | None = None
            for grads in self._graph:
                hv = self._product(grads, v, retain=True)
                out = hv if out is None else [a + b for a, b in zip(out, hv)]
            assert out is not None
            return out
        out = None
        for i in range(self.objective.n_terms):
            hv = self._product(self._grads(i), v, retain=False)
            if out is None:
                out = hv
            else:
                V.axpy_(out, 1.0, hv)
        assert out is not None
        return out

    def quadratic_form(self, v: Sequence[Tensor]) -> float:
        """``v^T H v`` (float64 accumulation)."""
        return V.dot(v, self(v))

    def close(self) -> None:
        """Free the cached graph."""
        self._graph = None

    def __enter__(self) -> HessianOperator:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def hvp(
    model: ModelLike,
    data: DataLike,
    v: Sequence[Tensor],
    *,
    loss_fn: LossFn | None = None,
) -> V.Vector:
    """The Hessian-vector product ``Hv`` of ``L(w)`` at the current weights.

    ``Hv = grad_w <grad_w L(w), v>`` by double backward, over the trainable
    parameters, the model in eval mode (restored afterwards). ``v`` is a list
    of tensors shaped like the trainable parameters.

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> import torch
    >>> from torch import nn
    >>> import flatminima
    >>> model = nn.Linear(2, 1, bias=False)
    >>> _ = nn.init.zeros_(model.weight)
    >>> x, y = torch.tensor([[1.0, 0.0], [0.0, 2.0]]), torch.ones(2, 1)
    >>> mse = nn.functional.mse_loss
    >>> v = [torch.ones_like(p) for p in model.parameters()]
    >>> flatminima.sharpness.hvp(model, [(x, y)], v, loss_fn=mse)
    [tensor([[1., 4.]])]

    Reference: B. A. Pearlmutter, "Fast exact multiplication by the Hessian",
    Neural Computation 6(1), 1994.
    """
    objective = Objective(model, data, loss_fn)
    if not isinstance(v, Sequence) or isinstance(v, Tensor):
        v = [v] if isinstance(v, Tensor) else list(v)
    for i, (vi, p) in enumerate(zip(v, objective.params)):
        if not isinstance(vi, Tensor):
            raise TypeError(f"v[{i}] must be a torch.Tensor, got {type(vi).__name__}")
        if vi.shape != p.shape:
            raise ValueError(f"v[{i}] has shape {tuple(vi.shape)}, parameter {i} has shape {tuple(p.shape)}")
    with objective.measuring(restore_weights=False), HessianOperator(objective, cache_graph=False) as H:
        return H(v)
