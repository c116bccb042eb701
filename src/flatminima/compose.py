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

from ._base import SharpnessAware
from ._parts import Always, Ascent, Combine, Descend, Plain, Schedule
from ._selection import SampleSelection
from .ae_sam import AdaptivePolicy
from .asam import Adaptive
from .esam import Mask
from .every_k import EveryK
from .fisher_sam import Fisher
from .friendly_sam import Friendly
from .gcsam import Centralize
from .gsam import SurrogateGap
from .looksam import Reuse
from .momentum_sam import Momentum
from .vasso import Variance
from .wsam import Weighted

ASCENTS: dict[str, type[Ascent]] = {
    c.name: c for c in (Plain, Adaptive, Centralize, Fisher, Friendly, Variance, Mask, Momentum)
}
COMBINES: dict[str, type[Combine]] = {c.name: c for c in (Descend, Weighted, SurrogateGap, Reuse)}
SCHEDULES: dict[str, type[Schedule]] = {c.name: c for c in (Always, EveryK, AdaptivePolicy)}
#: naming these parts turns their flag on by default
_FLAGS = {"asam": "adaptive", "centralize": "centralize"}
_CLASSES: dict[tuple[tuple[str, ...], str, str], type[SharpnessAware]] = {}


def _pick(kind: str, table: dict[str, Any], name: Any) -> Any:
    if not isinstance(name, str):
        raise TypeError(f"{kind} must be a part name (str), got {name!r}")
    if name not in table:
        raise ValueError(f"unknown {kind} {name!r}; known: {', '.join(table)}")
    return table[name]()


def method_class(ascent: str | Sequence[str] = "sam", combine: str = "sam", schedule: str = "always") -> type[SharpnessAware]:
    """The optimizer class of one product (the same class for the same
    names, so its state dicts load into each other's instances). Raises a
    ValueError naming both parts for a product that cannot work."""
    chain = (ascent,) if isinstance(ascent, str) else tuple(ascent)
    key = (chain, combine, schedule)
    if key not in _CLASSES:
        parts = tuple(_pick("ascent", ASCENTS, a) for a in chain) or (Plain(),)
        defaults: dict[str, Any] = {_FLAGS[a]: True for a in chain if a in _FLAGS}
        if any(isinstance(p, Mask) for p in parts) and (combine, schedule) != ("sam", "always"):
            defaults["skip_inactive_grads"] = False  # the clean gradient of every tensor is used
        body = {
            "ascent": parts,
            "combine": _pick("combine", COMBINES, combine),
            "schedule": _pick("schedule", SCHEDULES, schedule),
            "option_defaults": defaults,
            "__doc__": f"ascent {'+'.join(chain)}, combine {combine}, schedule {schedule}\n\n    Args:\n        @shared_args@\n",
            "__module__": __name__,
        }
        bases = (SampleSelection, SharpnessAware) if any(isinstance(p, Mask) for p in parts) else (SharpnessAware,)
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
