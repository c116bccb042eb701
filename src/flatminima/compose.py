"""Any product of an ascent chain, a combine and a schedule, as one optimizer.

Every paper method is a preset of this composition (``SAM`` is ascent
``centralize, asam`` (both off unless asked), combine ``sam``, schedule
``always``). :func:`compose` builds any other valid product::

    >>> import torch, flatminima
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = flatminima.compose(model.parameters(), torch.optim.SGD, ascent="fisher", combine="gsam",
    ...                          schedule="every_k", k=2, rho=0.1, eta=1.0, alpha=0.4, lr=0.1, momentum=0.9)
    >>> type(opt).__name__
    'Composed[fisher|gsam|every_k]'
    >>> flatminima.compose(model.parameters(), torch.optim.SGD, ascent="momentum", combine="wsam", lr=0.1)
    Traceback (most recent call last):
    ...
    ValueError: 'momentum' ascent and 'wsam' combine: a momentum step has no clean gradient at w (one pass, at w + eps), and wsam needs one

Naming a part that has a flag (``asam``: ``adaptive``, ``centralize``) turns
the flag on by default. The invalid products and why: docs/composition.md.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from . import registry  # noqa: F401  (imports every method's module, so its parts are known)
from ._base import SharpnessAware
from ._parts import PARTS, Plain

#: naming these parts turns their flag on by default
_FLAGS = {"asam": "adaptive", "centralize": "centralize"}
_CLASSES: dict[tuple[tuple[str, ...], str, str], type[SharpnessAware]] = {}


def _pick(kind: str, table: dict[str, Any], name: Any) -> Any:
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a part name (str), got {name!r}")
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]()


def method_class(ascent: str | Sequence[str] = "sam", combine: str = "sam", schedule: str = "always") -> type[SharpnessAware]:
    """The optimizer class of one product (the same class for the same
    names, so its state dicts load into each other's instances). Raises a
    ValueError naming both parts for a product that cannot work."""
    chain = (ascent,) if isinstance(ascent, str) else tuple(ascent)
    if not chain:
        raise ValueError("ascent must name at least one part ('sam' for v = g)")
    key = (chain, combine, schedule)
    if key not in _CLASSES:
        parts = tuple(_pick("ascent", PARTS["ascent"], a) for a in chain) or (Plain(),)
        defaults: dict[str, Any] = {_FLAGS[a]: True for a in chain if a in _FLAGS}
        for part in parts:
            defaults.update(part.product_defaults(combine, schedule))
        body = {
            "ascent": parts,
            "combine": _pick("combine", PARTS["combine"], combine),
            "schedule": _pick("schedule", PARTS["schedule"], schedule),
            "option_defaults": defaults,
            "__doc__": f"ascent {'+'.join(chain)}, combine {combine}, schedule {schedule}\n\n    Args:\n        @shared_args@\n",
            "__module__": __name__,
        }
        bases = (*{p.feature for p in parts if p.feature is not None}, SharpnessAware)
        _CLASSES[key] = type(f"Composed[{'+'.join(chain)}|{combine}|{schedule}]", bases, body)
    return _CLASSES[key]


def compose(
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    base_optimizer: type[Optimizer] | Optimizer,
    *,
    ascent: str | Sequence[str] = "sam",
    combine: str = "sam",
    schedule: str = "always",
    **kwargs: Any,
) -> SharpnessAware:
    """A sharpness-aware optimizer from its three parts.

    Args:
        params, base_optimizer: as for every method.
        ascent: how ``eps`` comes from ``g``: one of ``sam`` (``v = g``),
            ``asam``, ``centralize``, ``fisher``, ``friendly``, ``vasso``,
            ``esam``, ``momentum``, or a list of them (a chain, applied in
            order; ``momentum`` first).
        combine: how ``g`` and ``g_p`` become the direction: ``sam``, ``wsam``,
            ``gsam``, ``looksam``.
        schedule: when the perturbed pass runs: ``always``, ``every_k``, ``ae_sam``.
        **kwargs: the parts' options (``rho``, ``k``, ``gamma``, ...), the
            shared ones (``max_grad_norm``, ``model``...) and the base
            optimizer's arguments; ``inspect.signature(method_class(...))``
            lists them.
    """
    return method_class(ascent, combine, schedule)(params, base_optimizer, **kwargs)
