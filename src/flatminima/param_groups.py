"""Split a model's parameters into groups: weights vs biases and normalisation
parameters, or (for Muon) the 2-D weights of hidden layers vs the rest."""

from __future__ import annotations

from collections.abc import Collection
from fnmatch import fnmatchcase
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
    rule: Literal["bias_and_norm", "asam", "muon"] = "bias_and_norm",
) -> list[dict[str, Any]]:
    """Return ``[{"params": weights, **weights}, {"params": others, **others}]``.

    ``rule="bias_and_norm"`` (default): "others" are biases, every parameter
    of a normalisation layer (BatchNorm, LayerNorm, GroupNorm, RMSNorm, ...),
    any parameter with fewer than 2 dims, and the parameters the model itself
    exempts from weight decay, as timm's optimizer factory reads them: the
    names ``model.no_weight_decay()`` returns (``cls_token``, ``pos_embed``;
    ``fnmatch`` patterns, a name that matches no parameter is ignored) and the
    names containing one of ``model.no_weight_decay_keywords()`` (Swin's
    ``relative_position_bias_table``). Names are those of
    ``model.named_parameters()``; a submodule's lists (a timm backbone inside
    your module) count too, with names relative to that submodule; a shared
    parameter is exempt under any of its names. ``rule="asam"``: "others" are parameters whose name does not
    contain ``"weight"`` — exactly the official ASAM code's scope (so
    BatchNorm's gamma *is* normalised there; ``no_weight_decay()`` plays no
    part). ``rule="muon"``: "weights" are the 2-D weights of hidden layers,
    what ``torch.optim.Muon`` is for; "others" are the rest, for AdamW: the
    first and the last layer (the first and the last module, in registration
    order, with a weight of 2 or more dims: input layer or embedding, and
    head), biases, normalisation parameters and weights of other shapes
    (convolutions); ``no_weight_decay()`` plays no part either.

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
    if rule not in ("bias_and_norm", "asam", "muon"):
        raise ValueError(f"Invalid rule value: {rule!r} (expected 'bias_and_norm', 'asam' or 'muon')")
    exempt = _exempt_from_weight_decay(model) if rule == "bias_and_norm" else set()
    layers = [m for m in model.modules() if not isinstance(m, _NORM_TYPES)
              and any(p.dim() >= 2 for p in m.parameters(recurse=False))]
    outer = {id(layers[0]), id(layers[-1])} if layers else set()  # Muon's docs: not the input layer, not the head
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
            elif rule == "muon":
                is_other = id(module) in outer or isinstance(module, _NORM_TYPES) or p.dim() != 2
            else:
                is_other = isinstance(module, _NORM_TYPES) or name.endswith("bias") or p.dim() < 2 or id(p) in exempt
            (rest if is_other else main).append(p)
    groups = [{"params": main, **(weights or {})}, {"params": rest, **(others or {})}]
    return [g for g in groups if g["params"]]


def _exempt_from_weight_decay(model: nn.Module) -> set[int]:
    """The ids of the parameters that ``model`` or one of its submodules
    exempts from weight decay by name (a timm backbone inside the user's
    module keeps its exemptions; its names are relative to itself)."""
    exempt: set[int] = set()
    for module in model.modules():
        patterns = _names(module, "no_weight_decay")
        keywords = _names(module, "no_weight_decay_keywords")
        if patterns or keywords:
            exempt.update(
                id(p)
                for name, p in module.named_parameters(remove_duplicate=False)
                if any(fnmatchcase(name, pat) for pat in patterns) or any(k in name for k in keywords)
            )
    return exempt


def _names(model: nn.Module, method: str) -> Collection[str]:
    """What ``model.<method>()`` returns (nothing without the method), checked
    to be names: a bare string would otherwise be read letter by letter."""
    where = f"{type(model).__name__}.{method}"
    fn = getattr(model, method, None)
    if fn is None:
        return ()
    if not callable(fn):
        raise TypeError(f"{where} must be a method returning parameter names, got {type(fn).__name__}")
    names = fn()
    if isinstance(names, (str, bytes)) or not isinstance(names, Collection):
        raise TypeError(f"{where}() must return a collection of str, got {type(names).__name__} {names!r}")
    for n in names:
        if not isinstance(n, str):
            raise TypeError(f"{where}() must return a collection of str, got an item {type(n).__name__} {n!r}")
    return names
