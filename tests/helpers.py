"""Small models, data and training loops shared by the tests."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import flatminima


def mlp(dtype: torch.dtype = torch.float64, seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 16)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(16))
    layers += [nn.Tanh(), nn.Linear(16, 12), nn.Tanh(), nn.Linear(12, 3)]
    return nn.Sequential(*layers).to(dtype)


def batches(n: int, dtype: torch.dtype = torch.float64, seed: int = 1, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(size, 6, generator=g, dtype=dtype), torch.randint(0, 3, (size,), generator=g)) for _ in range(n)
    ]


def two_groups(model: nn.Module, **second: Any) -> list[dict[str, Any]]:
    """Weights in one group, biases in another (with ``second`` options)."""
    weights = [p for n, p in model.named_parameters() if n.endswith("weight")]
    biases = [p for n, p in model.named_parameters() if not n.endswith("weight")]
    return [{"params": weights}, {"params": biases, **second}]


def make_closure(
    opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str = "loss"
) -> Callable[..., torch.Tensor]:
    """A closure of the form ``kind`` (methods_db.Case.closure): "loss" is
    PyTorch's (zero grads, forward, backward, return the loss); "per_sample"
    returns the unreduced losses of the batch, or of the samples ``indices``,
    and leaves zeroing and backward to the optimizer."""
    if kind == "per_sample":

        def per_sample(indices: torch.Tensor | None = None) -> torch.Tensor:
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return nn.functional.cross_entropy(model(xb), yb, reduction="none")

        return per_sample
    if kind != "loss":
        raise ValueError(f"unknown closure form {kind!r}")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def explicit_step(
    opt: flatminima.SharpnessAware, model: nn.Module, x: torch.Tensor, y: torch.Tensor, kind: str = "loss"
) -> torch.Tensor:
    """The popular snippet's loop, written the way its users write it.

    With ``kind="per_sample"`` (methods_db.Case.closure), the explicit form of
    the per-sample protocol: the clean pass inside ``opt.clean_pass()``, a
    no-grad forward at ``w + eps`` ranking the samples, ``opt.select_samples``
    and the perturbed backward on the selected samples' mean loss. A pre-pass
    method (Momentum-SAM) is called in its own documented order: first_step,
    its only backward, second_step (the loss returned is the one at w + eps)."""
    if pre_pass(type(opt)):
        opt.first_step(zero_grad=True)
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.second_step(zero_grad=True)
        return loss
    if kind == "per_sample":
        with opt.clean_pass():  # type: ignore[attr-defined]
            losses = nn.functional.cross_entropy(model(x), y, reduction="none")
            if losses.requires_grad:  # False when the mask hides every tensor the loss uses
                losses.mean().backward()
        if opt.first_step(zero_grad=True):
            with torch.no_grad():
                after = nn.functional.cross_entropy(model(x), y, reduction="none")
            idx = opt.select_samples(losses.detach(), after)  # type: ignore[attr-defined]
            nn.functional.cross_entropy(model(x[idx]), y[idx], reduction="none").mean().backward()
        opt.second_step(zero_grad=True)
        return losses.detach().mean()
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    if opt.first_step(zero_grad=True):
        nn.functional.cross_entropy(model(x), y).backward()
    opt.second_step(zero_grad=True)
    return loss


def params_of(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# --- shared by test_resume / test_nonfinite / test_groups -------------------


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """Recursive exact comparison of nested dicts/lists/tuples; tensors with
    ``torch.equal`` (plus dtype and shape), NaN-free scalars with ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), f"{path}: {type(a)} vs {type(b)}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: tensors differ (max abs diff {(a.double() - b.double()).abs().max().item()})"
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b)}"
        assert set(a) == set(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{path}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}[{i}]")
    else:
        assert type(a) is type(b) and a == b, f"{path}: {a!r} vs {b!r}"


def clone_tree(a: Any) -> Any:
    """Deep copy of a nested state dict with every tensor cloned."""
    if isinstance(a, torch.Tensor):
        return a.detach().clone()
    if isinstance(a, dict):
        return {k: clone_tree(v) for k, v in a.items()}
    if isinstance(a, (list, tuple)):
        return type(a)(clone_tree(v) for v in a)
    return copy.deepcopy(a)


def held_tensor_bytes(
    opt: Any, *, skip: tuple[str, ...] = ("base_optimizer", "param_groups", "model"), min_numel: int = 2
) -> int:
    """Bytes of every tensor reachable from ``opt.__dict__`` (through dicts,
    lists, tuples, sets and plain objects such as dataclasses), leaving out the
    attributes in ``skip`` and the parameters and ``.grad`` tensors themselves:
    what the optimizer holds beyond the model. Tensors with fewer than
    ``min_numel`` elements (0-dim scalars such as step counts) are ignored."""
    import dataclasses

    own = {id(p) for g in opt.param_groups for p in g["params"]}
    own |= {id(p.grad) for g in opt.param_groups for p in g["params"] if p.grad is not None}
    seen: set[int] = set()
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if id(obj) not in own and obj.numel() >= min_numel:
                total += obj.numel() * obj.element_size()
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(k)
                walk(v)
        elif isinstance(obj, (list, tuple, set, frozenset)):
            for v in obj:
                walk(v)
        elif isinstance(obj, (nn.Module, torch.optim.Optimizer)) or callable(obj):
            return
        elif dataclasses.is_dataclass(obj) or hasattr(obj, "__dict__"):
            for v in vars(obj).values():
                walk(v)

    for name, value in vars(opt).items():
        if name not in skip:
            walk(value)
    return total


def param_bytes(model_or_opt: Any) -> int:
    params = (
        list(model_or_opt.parameters())
        if isinstance(model_or_opt, nn.Module)
        else [p for g in model_or_opt.param_groups for p in g["params"]]
    )
    return sum(p.numel() * p.element_size() for p in params)


# --- shared by test_reference / test_equivalence / test_foreach --------------


def shared_group_keys(method: str, base_cls: type[torch.optim.Optimizer]) -> set[str]:
    """Per-group hyperparameters of ``method`` that are also options of
    ``base_cls``. The two optimizers share one list of group dicts, so such a
    key silently sets both (SAM's denominator ``eps`` vs Adam's ``eps``); a
    non-empty result is a library bug (tests/test_reference.py checks it)."""
    p = nn.Parameter(torch.zeros(1))
    if pre_pass(method):  # it reads a base optimizer's momentum, so it refuses an optionless one
        ours = set(flatminima.get_method(method).cls.group_options)
    else:
        ours = set(flatminima.create(method, [p], _OptionlessOptimizer).param_groups[0]) - {"params"}
    return ours & set(base_cls([p]).defaults)


class _OptionlessOptimizer(torch.optim.Optimizer):
    """A base optimizer without options: its groups hold only the method's keys."""

    def __init__(self, params: Any) -> None:
        super().__init__(params, {})

    def step(self, closure: Any = None) -> None:
        return None


def max_abs_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    assert len(a) == len(b)
    return max(((x.double() - y.double()).abs().max().item() if x.numel() else 0.0) for x, y in zip(a, b))


def one_case_per_method(cases: list[Any]) -> list[Any]:
    """The first configuration of each method (for protocol tests whose
    outcome does not depend on the hyperparameters; cheaper than all CASES).
    Configurations that take PyTorch's closure form (``Case.closure ==
    "loss"``) come first: these tests write such closures by hand."""
    seen: set[str] = set()
    ordered = sorted(cases, key=lambda c: getattr(c, "closure", "loss") != "loss")  # stable
    first = {id(c) for c in ordered if not (c.method in seen or seen.add(c.method))}
    return [c for c in cases if id(c) in first]


def chunk_closure(
    opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int, kind: str = "loss"
) -> Callable[..., torch.Tensor]:
    """The closure of ``step(closure, chunks=chunks)``: ``closure(i, ...)`` is
    :func:`make_closure`'s closure on chunk ``i`` of ``x.chunk(chunks)``."""
    xs, ys = x.chunk(chunks), y.chunk(chunks)

    def closure(i: int, *args: Any) -> torch.Tensor:
        return make_closure(opt, model, xs[i], ys[i], kind)(*args)

    return closure


def shard_closures(
    opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, chunks: int, kind: str = "loss"
) -> list[Callable[..., torch.Tensor]]:
    """One :func:`make_closure` per chunk of ``x.chunk(chunks)`` (for the references' sharded_step)."""
    return [make_closure(opt, model, xb, yb, kind) for xb, yb in zip(x.chunk(chunks), y.chunk(chunks))]


def refuses_base(method: str, base_cls: type, error: Exception) -> bool:
    """Whether ``error`` is a pre-pass method's refusal of a base optimizer
    whose momentum it cannot read (its message names that optimizer)."""
    return pre_pass(method) and isinstance(error, ValueError) and f"cannot read it from {base_cls.__name__}" in str(error)


def pre_pass(method: str | type) -> bool:
    """Whether ``method`` (a registered name, or an optimizer class) perturbs
    before its only pass (Momentum-SAM): one closure call per step, no clean
    pass; read from the class."""
    cls = flatminima.get_method(method).cls if isinstance(method, str) else method
    return bool(cls.pre_pass)


def closure_for(
    opt: Any, model: nn.Module, x: torch.Tensor, y: torch.Tensor, bad_call: int | None = None, mode: str = "nan_loss"
) -> tuple[Callable[[], torch.Tensor], list[int]]:
    """A closure whose ``bad_call``-th call (1 = clean pass, 2 = perturbed
    pass) produces a non-finite gradient (``mode``: nan_loss, inf_loss, nan_grad or inf_grad, the
    latter two in one element of one tensor); ``calls`` counts the calls."""
    calls = [0]

    def closure() -> torch.Tensor:
        calls[0] += 1
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        bad = calls[0] == bad_call
        if bad and mode.endswith("_loss"):
            scale = torch.tensor(math.nan if mode == "nan_loss" else math.inf, dtype=loss.dtype)
            loss = loss * scale
        loss.backward()
        if bad and mode.endswith("_grad"):
            p = list(model.parameters())[1]  # one element of one tensor
            p.grad.view(-1)[3] = math.nan if mode == "nan_grad" else math.inf
        return loss

    return closure, calls
