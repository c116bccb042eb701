"""Split a model's parameters into groups: weights vs biases and normalisation parameters."""

from __future__ import annotations

from typing import Any, Literal

from torch import nn

_NORM_TYPES = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def split_param_groups(
    model: nn.Module,
    *,
    weights: dict[str, Any] | None = None,
    others: dict[str, Any] | None = None,
    rule: Literal["bias_and_norm", "asam"] = "bias_and_norm",
) -> list[dict[str, Any]]:
    """Return ``[{"params": weights, **weights}, {"params": others, **others}]``.

    ``rule="bias_and_norm"`` (default): "others" are biases, every parameter
    of a normalisation layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...)
    and any parameter with fewer than 2 dims — the usual set to exempt from
    weight decay. ``rule="asam"``: "others" are parameters whose name does not
    contain ``"weight"`` — exactly the official ASAM code's scope (so
    BatchNorm's gamma *is* normalised there).

    Shared parameters appear once. Empty groups are dropped.

    >>> import torch
    >>> from torch import nn
    >>> import flatminima
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    >>> groups = split_param_groups(model, others={"weight_decay": 0.0})
    >>> [len(g["params"]) for g in groups]  # the two Linear weights; biases and BatchNorm's
    [2, 4]
    >>> groups[1]["weight_decay"]
    0.0

    ASAM with the official scope (BatchNorm's weight normalised too), in one line:

    >>> opt = flatminima.SAM(split_param_groups(model, rule="asam", others={"adaptive": False}),
    ...                      torch.optim.SGD, adaptive=True, rho=0.5, lr=0.1)
    >>> [(len(g["params"]), g["adaptive"]) for g in opt.param_groups]
    [(3, True), (3, False)]
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if rule not in ("bias_and_norm", "asam"):
        raise ValueError(f"Invalid rule value: {rule!r} (expected 'bias_and_norm' or 'asam')")
    seen: set[int] = set()
    main: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    for module_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if rule == "asam":
                is_other = "weight" not in f"{module_name}.{name}"
            else:
                is_other = isinstance(module, _NORM_TYPES) or name.endswith("bias") or p.dim() < 2
            (rest if is_other else main).append(p)
    groups = [{"params": main, **(weights or {})}, {"params": rest, **(others or {})}]
    return [g for g in groups if g["params"]]
