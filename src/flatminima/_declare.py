"""From a method's parts to its class: options, signature, docs, checks.

``SharpnessAware.__init_subclass__`` calls :func:`declare` on every method
class: it gathers the options of the parts (the shared ones from
``_options``), checks that the product of the parts can work, and derives
what the protocol and the tools read (the constructor's signature, the
state-dict options, whether the clean gradient is kept...). Nothing is
written twice: a method class names its parts and, where it differs, a
default.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from . import _options as O
from ._parts import check_product

if TYPE_CHECKING:
    from ._base import SharpnessAware


def declare(cls: type[SharpnessAware]) -> None:
    parts = cls.parts()
    check_product(cls.ascent, cls.combine, cls.schedule)
    group: dict[str, O.Option] = {"rho": O.SHARED["rho"]}
    wide: dict[str, O.Option] = {}
    for part in parts:
        for name in part.shared:
            group[name] = O.SHARED[name]
        for name, option in part.options.items():
            (wide if option.wide else group)[name] = option
    group["norm_eps"] = O.SHARED["norm_eps"]
    wide.update(O.PROTOCOL)
    for name, value in cls.option_defaults.items():
        table = group if name in group else wide
        table[name] = O.Option(value, table[name].check, table[name].doc, table[name].wide, table[name].saved)
    cls.group_options = group
    cls.wide_options = wide
    cls.method_options = ("max_grad_norm", "sync_perturbations") + tuple(
        n for n, o in wide.items() if o.saved and n not in O.PROTOCOL
    )
    cls.keeps_clean_grad = any(p.needs_clean_grad for p in parts)
    cls.decides_from_gradient = any(p.reads_gradient for p in (cls.combine, cls.schedule))
    cls.pre_pass = bool(cls.ascent) and cls.ascent[0].pre_pass
    cls.shard_state = tuple(k for p in parts for k in p.shard_state)
    own = {n: o for n, o in wide.items() if n not in O.PROTOCOL}
    if "__init__" in vars(cls):  # a subclass with a constructor of its own: its signature is the truth
        cls.__signature__ = None  # type: ignore[attr-defined]
    else:
        cls.__signature__ = _signature(own, group)  # type: ignore[attr-defined]
    cls.__doc__ = O.splice(cls.__doc__, {**{n: o for n, o in group.items() if n in O.SHARED}, **O.PROTOCOL})


def _signature(own: dict[str, O.Option], group: dict[str, O.Option]) -> inspect.Signature:
    keyword = [*own.items(), *group.items(), *O.PROTOCOL.items()]
    return inspect.Signature(
        [
            inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            inspect.Parameter("base_optimizer", inspect.Parameter.POSITIONAL_OR_KEYWORD),
            *[inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=o.default) for n, o in keyword],
            inspect.Parameter("base_kwargs", inspect.Parameter.VAR_KEYWORD),
        ]
    )


def split_options(cls: type[SharpnessAware], kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """``kwargs`` of a constructor call as (group defaults, method-wide values,
    the base optimizer's arguments), each option checked."""
    wide = {}
    for name, option in cls.wide_options.items():
        value = kwargs.pop(name, option.default)
        wide[name] = option.check(name, value)
    group = {name: kwargs.pop(name, option.default) for name, option in cls.group_options.items()}
    return group, wide, kwargs
