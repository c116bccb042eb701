"""timm's optimizer factory (optional: ``pip install timm``; docs/timm.md).

``timm.optim.create_optimizer_v2(model, opt)`` reads ``opt`` as
``[lookahead_]<name>``: it splits the name on ``_`` and builds the optimizer
registered under the **last** part, so an entry named ``flatsam_sgd`` is
never reached and ``"flatsam_sgd"`` silently builds timm's plain SGD.
:func:`register` adds one entry per method and base optimizer to timm's
registry, under a name without ``_`` (``"sam-sgd"``)::

    import flatminima.timm

    name = flatminima.timm.register("sam", base="sgd")           # "sam-sgd"
    opt = timm.optim.create_optimizer_v2(model, name, lr=0.1, weight_decay=5e-4, rho=0.05)

timm then builds its parameter groups (weight decay, layer decay) as for
any optimizer, and the entry builds ``flatminima.create(method, groups,
<timm's base class>, **options)``: the method's options (``rho``, ...) and
the base optimizer's (``lr``, ``momentum``, ``eps``, ``betas``, timm's
defaults such as SGD's ``nesterov=True``) all pass through timm's keyword
arguments.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ._base import SharpnessAware
from .registry import create, get_method

__all__ = ["TimmMethod", "register", "timm_name"]


def timm_name(method: str, base: str = "sgd") -> str:
    """The name :func:`register` gives ``method`` over ``base`` by default:
    both joined by ``-``, every ``_`` turned into ``-`` (timm splits on ``_``).

    >>> timm_name("sam_every_k", "adamw")
    'sam-every-k-adamw'
    """
    return f"{get_method(method).name}-{base.lower()}".replace("_", "-")


def check_name(name: str) -> str:
    """``name`` as timm stores it (lower case), if timm's factory can reach it."""
    if not isinstance(name, str):
        raise TypeError(f"a timm optimizer name must be a str, got {type(name).__name__}")
    if not name:
        raise ValueError("a timm optimizer name must not be empty")
    if "_" in name:
        last = name.lower().split("_")[-1]
        raise ValueError(
            f"timm optimizer name {name!r} contains '_': timm's create_optimizer_v2 splits names on '_' and builds "
            f"the optimizer registered as {last!r}, so this entry could never be reached; use '-' instead, "
            f"e.g. {name.replace('_', '-')!r}"
        )
    return name.lower()


@dataclass(frozen=True)
class TimmMethod:
    """What a timm entry builds: ``flatminima.create(method, params, <base
    class>, **kwargs)``, the base class read from timm's registry when the
    optimizer is built (timm imports some lazily). timm adds the entry's
    defaults to ``kwargs``."""

    method: str
    base: str
    registry: Any

    def __call__(self, params: Iterable[Tensor] | Iterable[dict[str, Any]], **kwargs: Any) -> SharpnessAware:
        base_cls = self.registry.get_optimizer_class(self.base, bind_defaults=False)
        return create(self.method, params, base_cls, **kwargs)


def register(
    method: str,
    base: str = "sgd",
    *,
    name: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    registry: Any = None,
) -> str:
    """Register ``method`` over timm's ``base`` optimizer in timm's optimizer
    registry and return the name to give ``create_optimizer_v2``.

    Args:
        method: a flatminima method (``flatminima.list_methods()``).
        base: a timm optimizer name (``timm.optim.list_optimizers()``): the
            base optimizer, with timm's defaults for it (``"sgd"`` is SGD with
            Nesterov momentum, ``"momentum"`` without) and the arguments timm
            hands it (``momentum``, ``eps``, ``betas``).
        name: the entry's name (default ``timm_name(method, base)``); it must
            not contain ``_``, which timm's factory splits on.
        defaults: options applied unless the call to ``create_optimizer_v2``
            gives them (``{"rho": 0.1}``).
        registry: a ``timm.optim.OptimizerRegistry`` (default: timm's own,
            which ``create_optimizer_v2`` reads).

    Registering the same entry again returns its name; a name that timm or an
    earlier :func:`register` call already uses for something else raises
    ValueError (timm's own ``register`` would overwrite it with a warning).
    """
    spec = get_method(method)
    if not isinstance(base, str):
        raise TypeError(f"base must be a timm optimizer name (a str), got {type(base).__name__}")
    key = check_name(name if name is not None else timm_name(spec.name, base))
    if registry is None:
        registry = _default_registry()
    from timm.optim import OptimInfo

    try:
        base_info = registry.get_optimizer_info(base)
    except ValueError:
        raise ValueError(
            f"unknown timm base optimizer {base!r}; timm.optim.list_optimizers() lists the names it takes"
        ) from None
    if isinstance(base_info.opt_class, TimmMethod):
        raise ValueError(f"base {base!r} is itself a flatminima method ({base_info.opt_class.method}); give a timm optimizer")
    if base_info.second_order:
        raise ValueError(
            f"timm base optimizer {base!r} is second order (its step needs the backward's graph, create_graph=True), "
            "which the sharpness-aware passes do not keep; choose a first-order base"
        )
    factory = TimmMethod(spec.name, base_info.name, registry)
    info = OptimInfo(
        name=key,
        opt_class=factory,  # type: ignore[arg-type]  # timm only calls it: opt_class(params, **opt_args)
        description=f"flatminima {spec.name} over timm's {base_info.name}: {spec.summary}",
        has_eps=base_info.has_eps,
        has_momentum=base_info.has_momentum,
        has_betas=base_info.has_betas,
        num_betas=base_info.num_betas,
        defaults={**(base_info.defaults or {}), **(defaults or {})} or None,
    )
    if key in registry.list_optimizers():
        if registry.get_optimizer_info(key) == info:
            return key
        raise ValueError(
            f"timm optimizer name {key!r} is already registered as {registry.get_optimizer_info(key).description!r}; "
            "pass another name="
        )
    registry.register(info)
    return key


def _default_registry() -> Any:
    try:
        from timm.optim import _optim_factory
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            f"flatminima.timm.register needs timm ({e}); install it with `pip install timm`"
        ) from e
    return _optim_factory.default_registry
