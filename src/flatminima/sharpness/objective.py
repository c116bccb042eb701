"""The fixed objective every measure evaluates: ``L(w)`` on a fixed data set.

A sharpness measure is a property of a function of the weights, so the
function must not change between the calls a measure makes: the data set is
fixed (a list of batches, materialised once) and the model runs in eval mode
(dropout off, BatchNorm on its running statistics), as PyHessian does.

Two ways to give the objective:

* ``model`` an :class:`torch.nn.Module` and ``data`` a list of ``(x, y)``
  batches (or one ``(x, y)`` pair of tensors): the loss is the sample-weighted
  mean over the batches,

  ``L(w) = sum_b n_b * loss_fn(model(x_b), y_b) / sum_b n_b``,

  where ``n_b`` is the batch size (``len(y_b)``) and ``loss_fn`` reduces by
  mean (default :func:`torch.nn.functional.cross_entropy`). With one batch
  this is exactly ``loss_fn(model(x), y)``.
* ``data`` a loss callable ``() -> Tensor`` (a scalar that depends on the
  parameters, e.g. a closure over your model and data): ``L(w) = data()``.
  ``model`` is then an :class:`~torch.nn.Module` or a list of the tensors
  ``w`` (for instance ``[w]`` for a quadratic ``0.5 * w @ A @ w``).

The weights ``w`` are the *trainable* parameters: those with
``requires_grad=True``, in ``model.parameters()`` order.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _vectors as V

LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]
ModelLike = Union[nn.Module, Sequence[Tensor]]
DataLike = Union[Iterable[Batch], Batch, Callable[[], Tensor]]


def trainable_parameters(model: ModelLike) -> list[Tensor]:
    """The tensors a measure differentiates by: ``requires_grad`` parameters
    of a module, or the given tensors (each must require grad)."""
    if isinstance(model, nn.Module):
        params: list[Tensor] = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError(f"model {type(model).__name__} has no trainable parameters (requires_grad=True)")
        return params
    if isinstance(model, Tensor):
        model = [model]
    if not isinstance(model, Iterable):
        raise TypeError(f"model must be a torch.nn.Module or a list of tensors, got {type(model).__name__}")
    params = list(model)
    if not params:
        raise ValueError("model is an empty list of tensors")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise TypeError(f"model[{i}] must be a torch.Tensor, got {type(p).__name__}")
        if not p.requires_grad:
            raise ValueError(f"model[{i}] (shape {tuple(p.shape)}) does not require grad")
        if not p.is_floating_point():
            raise TypeError(f"model[{i}] must be a floating-point tensor, got {p.dtype}")
    return params


def _batch_size(x: Any, y: Any) -> int:
    for t in (y, x):
        if isinstance(t, Tensor) and t.dim() >= 1:
            return int(t.shape[0])
    return 1


def _to(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _batches(data: Any, device: torch.device) -> list[Batch]:
    if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Tensor) and isinstance(data[1], Tensor):
        data = [tuple(data)]  # one (x, y) pair
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a list of (x, y) batches, one (x, y) pair of tensors or a loss callable, "
            f"got {type(data).__name__}"
        )
    out: list[Batch] = []
    for i, item in enumerate(data):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            what = f"{type(item).__name__} of length {len(item)}" if isinstance(item, (tuple, list)) else type(item).__name__
            raise TypeError(f"data[{i}] must be an (x, y) pair, got {what}")
        x, y = item
        if _batch_size(x, y) == 0:
            raise ValueError(f"data[{i}] is an empty batch (0 samples)")
        out.append((_to(x, device), _to(y, device)))
    if not out:
        raise ValueError("data is empty: got 0 batches")
    return out


class Objective:
    """``L(w)`` on a fixed data set; see the module docstring.

    Args:
        model: an ``nn.Module``, or a list of tensors when ``data`` is a loss callable.
        data: a list of ``(x, y)`` batches, one ``(x, y)`` pair, or a loss callable.
        loss_fn: ``loss_fn(output, y) -> scalar`` reducing by mean
            (default cross-entropy); unused with a loss callable.
    """

    def __init__(self, model: ModelLike, data: DataLike, loss_fn: LossFn | None = None) -> None:
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
        self.module: nn.Module | None = model if isinstance(model, nn.Module) else None
        self.params: list[Tensor] = trainable_parameters(model)
        self.loss_fn: LossFn = loss_fn if loss_fn is not None else F.cross_entropy
        self.closure: Callable[[], Tensor] | None = None
        self.batches: list[Batch] = []
        self.weights: list[float] = []
        if callable(data) and not isinstance(data, nn.Module):
            self.closure = data
            self.n_samples = 0
            return
        if self.module is None:
            raise TypeError(
                "data given as (x, y) batches needs model to be a torch.nn.Module; with a list of tensors "
                "pass data as a loss callable () -> Tensor"
            )
        self._set_batches(_batches(data, self.params[0].device))

    def _set_batches(self, batches: list[Batch]) -> None:
        sizes = [_batch_size(x, y) for x, y in batches]
        total = sum(sizes)
        self.batches = batches
        self.n_samples = total
        self.weights = [1.0] if len(batches) == 1 else [n / total for n in sizes]

    def _sub(self, batches: list[Batch]) -> Objective:
        sub = object.__new__(Objective)
        sub.module, sub.params, sub.loss_fn, sub.closure = self.module, self.params, self.loss_fn, None
        sub._set_batches(batches)
        return sub

    # ------------------------------------------------------------ evaluation

    @property
    def is_callable(self) -> bool:
        return self.closure is not None

    @property
    def n_terms(self) -> int:
        """Number of separately evaluated terms (batches; 1 for a callable)."""
        return 1 if self.closure is not None else len(self.batches)

    def term(self, i: int) -> Tensor:
        """Term ``i`` of ``L``, already weighted (``n_b / N * loss_b``), with its graph."""
        if self.closure is not None:
            out = self.closure()
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise TypeError(f"the loss callable must return a scalar tensor, got {type(out).__name__}")
            return out.reshape(())
        assert self.module is not None
        x, y = self.batches[i]
        out = self.loss_fn(self.module(x), y)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise TypeError(f"loss_fn must return a scalar tensor, got {type(out).__name__}")
        out = out.reshape(())
        w = self.weights[i]
        return out if w == 1.0 else out * w

    def loss(self) -> float:
        """``L(w)`` at the current weights (no graph)."""
        with torch.no_grad():
            return sum(float(self.term(i)) for i in range(self.n_terms))

    def loss_and_grad(self) -> tuple[float, V.Vector]:
        """``(L(w), grad L(w))``; the gradient is detached, ``.grad`` untouched."""
        total = 0.0
        grad: V.Vector | None = None
        for i in range(self.n_terms):
            with torch.enable_grad():
                t = self.term(i)
                g = torch.autograd.grad(t, self.params, allow_unused=True, materialize_grads=True)
            total += float(t.detach())
            if grad is None:
                grad = [gi.detach() for gi in g]
            else:
                V.axpy_(grad, 1.0, g)
        assert grad is not None
        return total, grad

    def chunks(self, m: int | None) -> list[tuple[Objective, float]]:
        """Disjoint pieces ``M`` of the data with their weights ``|M| / N``.

        ``m=None``: one piece per batch as given (a loss callable is one
        piece). ``m`` an int: consecutive chunks of ``m`` samples in data
        order, crossing batch boundaries; the last one holds the remainder.
        Each piece is evaluated in slices no larger than the original batches.
        """
        if self.closure is not None:
            if m is not None:
                raise TypeError("m-sized chunks need data as (x, y) batches, not a loss callable")
            return [(self, 1.0)]
        if m is None:
            return [(self._sub([b]), w) for b, w in zip(self.batches, self.weights)]
        for i, (x, y) in enumerate(self.batches):
            if not (isinstance(x, Tensor) and isinstance(y, Tensor)):
                raise TypeError(f"m-sized chunks need tensor batches; data[{i}] holds {type(x).__name__}, {type(y).__name__}")
        out: list[tuple[Objective, float]] = []
        current: list[Batch] = []
        filled = 0
        for x, y in self.batches:
            start, n = 0, int(y.shape[0])
            while start < n:
                take = min(m - filled, n - start)
                current.append((x[start : start + take], y[start : start + take]))
                filled += take
                start += take
                if filled == m:
                    out.append((self._sub(current), m / self.n_samples))
                    current, filled = [], 0
        if current:
            out.append((self._sub(current), filled / self.n_samples))
        return out

    # ------------------------------------------------------------ weights

    def set_weights(self, base: Sequence[Tensor], delta: Sequence[Tensor] | None = None, alpha: float = 1.0) -> None:
        """``w <- base + alpha * delta`` (``w <- base`` without ``delta``), in place."""
        with torch.no_grad():
            for i, (p, b) in enumerate(zip(self.params, base)):
                p.copy_(b)
                if delta is not None:
                    p.add_(delta[i], alpha=alpha)

    @contextmanager
    def measuring(self, *, restore_weights: bool = True, restore_buffers: bool = False) -> Iterator[V.Vector]:
        """Eval mode for the module and, on exit, the weights (and floating
        buffers) copied back bit for bit and every module's training flag
        restored. Yields the saved weights ``w`` (a copy)."""
        saved = V.clone(self.params) if restore_weights else [p.detach() for p in self.params]
        with ExitStack() as stack:
            if self.module is not None:
                stack.enter_context(eval_mode(self.module))
                if restore_buffers:
                    stack.enter_context(_saved_buffers(self.module))
            try:
                yield saved
            finally:
                if restore_weights:
                    self.set_weights(saved)


@contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module.eval()`` inside, each submodule's own ``training`` flag back on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def _saved_buffers(module: nn.Module) -> Iterator[None]:
    saved = [(b, b.detach().clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                b.copy_(s)


@contextmanager
def twice_differentiable() -> Iterator[None]:
    """Route ``scaled_dot_product_attention`` to its plain math kernel, whose
    backward is differentiable again (the fused flash/memory-efficient
    kernels have no double backward). Other modules are unaffected."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # pragma: no cover - torch < 2.3
        yield
        return
    with sdpa_kernel(SDPBackend.MATH):
        yield


def evaluate_loss(model: ModelLike, data: DataLike, loss_fn: LossFn | None = None) -> float:
    """``L(w)`` as every measure sees it: the sample-weighted mean loss over
    ``data``, the model in eval mode (its training flags restored after).

    Example: least squares on two weights, ``L(w) = mean_i (w . x_i - y_i)^2``,
    whose Hessian is ``diag(1, 4)``:

    >>> model, data, mse = least_squares()  # written out in flatminima.sharpness.hvp's example
    >>> flatminima.sharpness.evaluate_loss(model, data, loss_fn=mse)  # == mse(model.eval()(x), y).item()
    1.0
    """
    objective = Objective(model, data, loss_fn)
    with objective.measuring(restore_weights=False):
        return objective.loss()
