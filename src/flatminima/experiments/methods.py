"""From method names to optimizers.

A method in an experiment is written ``NAME`` or ``NAME:key=value,...``:

* a name from the registry (``flatminima.list_methods()``): that
  sharpness-aware method wrapping the base optimizer (``--optimizer``);
* ``base``: the base optimizer alone (shown under its own name);
* the name of a ``torch.optim`` optimizer (``sgd``, ``adamw``, ...): that
  optimizer alone, with the shared settings (lr, weight decay, ...).

Inline options are the method's hyperparameters (``rho``, ``gamma``, ...)
or base-optimizer arguments (``lr``, ``momentum``, ...). Nothing here names
a particular method: a method added to the registry works at once.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

import flatminima

from .config import ExperimentConfig, parse_value
from .errors import ConfigError, MethodFailed

# torch optimizers that do not fit a plain minibatch loop
_EXCLUDED_OPTIMIZERS = {"lbfgs", "sparseadam"}
# Names that stand for a pair, as the optimizer's documentation recommends:
# torch.optim.Muon takes only 2-D parameters and is meant for the weights of
# hidden layers, with AdamW for the rest (see flatminima.muon_adamw).
_COMPOSITES: dict[str, type[Optimizer]] = {"muon": flatminima.MuonAdamW}


@lru_cache(maxsize=1)
def torch_optimizers() -> dict[str, type[Optimizer]]:
    """``torch.optim`` optimizer classes by lower-case name (``muon``: Muon + AdamW)."""
    out = {}
    for name, obj in vars(torch.optim).items():
        if inspect.isclass(obj) and issubclass(obj, Optimizer) and obj is not Optimizer:
            if name.lower() not in _EXCLUDED_OPTIMIZERS and not name.startswith("_"):
                out[name.lower()] = _COMPOSITES.get(name.lower(), obj)
    return dict(sorted(out.items()))


def model_params(cls: type[Optimizer], model: nn.Module) -> Any:
    """What ``cls`` is built over: the model's parameters, or for Muon + AdamW
    its groups (the 2-D weights of hidden layers for Muon, the rest for AdamW)."""
    if issubclass(cls, flatminima.MuonAdamW):
        return flatminima.muon_param_groups(model)
    return model.parameters()


def optimizer_class(name: str) -> type[Optimizer]:
    try:
        return torch_optimizers()[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown optimizer {name!r}; choose from {', '.join(torch_optimizers())}") from None


#: Default learning rates that differ from the optimizer's own: torch's SGD
#: default (1e-3) barely moves these models under momentum 0.9 and a cosine
#: decay; 0.1 is the rate of the SAM and WideResNet papers. Every other
#: optimizer keeps torch's default (0.001 for Adam/AdamW, 0.01 for RMSprop, ...).
DEFAULT_LR = {"sgd": 0.1}


def default_lr(optimizer: str) -> float:
    """The learning rate ``optimizer`` gets when ``--lr`` is not given.

    >>> default_lr("sgd"), default_lr("adamw"), default_lr("rmsprop")
    (0.1, 0.001, 0.01)
    """
    name = optimizer.lower()
    if name in DEFAULT_LR:
        return DEFAULT_LR[name]
    cls = optimizer_class(name)
    param = inspect.signature(cls.__init__).parameters.get("lr")
    if param is None or not _is_real(param.default) or not math.isfinite(param.default) or param.default <= 0:
        raise ConfigError(f"{name} has no default learning rate; give one with --lr, or inline as {name}:lr=VALUE")
    return float(param.default)


def _signature_keys(cls: type[Optimizer]) -> set[str]:
    return {
        n
        for n, p in inspect.signature(cls.__init__).parameters.items()
        if n not in ("self", "params") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def check_base_argument(cls: type[Optimizer], key: str, value: Any, where: str) -> None:
    """Refuse, naming it, a value the optimizer's own checks would misread: a
    string or a non-finite number where its default is a number (``lr=nan``
    arrives as the text ``'nan'``; torch then fails comparing it), a bool where
    it takes a bool, a tuple of the wrong length or kind."""
    default = inspect.signature(cls.__init__).parameters[key].default
    if isinstance(default, bool):
        ok, expected = isinstance(value, bool), "true or false"
    elif _is_real(default):
        ok, expected = _is_real(value) and math.isfinite(value), "a finite number"
    elif isinstance(default, tuple) and default and all(_is_real(d) for d in default):
        ok = (isinstance(value, (tuple, list)) and len(value) == len(default)
              and all(_is_real(v) and math.isfinite(v) for v in value))
        expected = f"{len(default)} finite numbers such as {default}"
    else:
        return  # None, strings, ...: the optimizer's own checks name the value
    if not ok:
        raise ConfigError(f"{where} {key}={value!r}: {cls.__name__}'s {key} must be {expected}")


@dataclass(frozen=True)
class Method:
    """One row of a comparison."""

    label: str  # as shown in tables and file names
    name: str  # registry name, "base", or torch optimizer name
    sharpness_aware: bool
    options: Mapping[str, Any] = field(default_factory=dict)  # inline NAME:key=value options
    optimizer: str = "sgd"  # the torch optimizer taking the steps

    @property
    def plain(self) -> bool:
        return not self.sharpness_aware


def _split_top_level(text: str) -> list[str]:
    """Split at commas outside brackets: ``"rho=0.1,betas=(0.8,0.9)"`` -> two items."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return parts


def parse_method(text: str, cfg: ExperimentConfig) -> Method:
    """Parse ``NAME`` or ``NAME:key=value,...`` (names are case-insensitive).

    >>> from flatminima.experiments.config import ExperimentConfig
    >>> parse_method("SAM:rho=0.1,adaptive=true", ExperimentConfig())
    Method(label='SAM:rho=0.1,adaptive=true', name='sam', sharpness_aware=True,
           options={'rho': 0.1, 'adaptive': True}, optimizer='sgd')
    >>> parse_method("adam", ExperimentConfig()).plain
    True
    """
    if not isinstance(text, str) or not text.strip():
        raise ConfigError(f"a method must be a non-empty name, got {text!r}")
    name, _, rest = text.strip().partition(":")
    name = name.strip().lower()
    options: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in _split_top_level(rest))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"method {text!r}: options must look like NAME:key=value,key=value")
        options[key.strip()] = parse_value(value)
    registry = flatminima.list_methods()
    if name in registry:
        return Method(text.strip(), name, True, options, cfg.optimizer.lower())
    if name == "base":
        label = cfg.optimizer.lower() + (":" + rest if rest else "")
        return Method(label, "base", False, options, cfg.optimizer.lower())
    if name in torch_optimizers():
        return Method(text.strip(), name, False, options, name)
    raise ConfigError(
        f"unknown method {name!r}; sharpness-aware methods: {', '.join(registry)}; "
        f"plain optimizers: base, {', '.join(torch_optimizers())}"
    )


def resolve_methods(cfg: ExperimentConfig) -> list[Method]:
    """The methods of ``cfg`` (``all`` expanded), checked: names, labels,
    options and hyperparameters, and the base optimizer."""
    optimizer_class(cfg.optimizer)
    names: list[str] = []
    for entry in cfg.methods:
        if entry.strip().lower() == "all":
            names += ["base", *flatminima.list_methods()]
        else:
            names.append(entry)
    methods = [parse_method(n, cfg) for n in names]
    seen: dict[str, str] = {}
    for m in methods:
        if m.label in seen:
            raise ConfigError(f"method {m.label!r} appears twice in --methods")
        seen[m.label] = m.name
    registry = set(flatminima.list_methods())
    for key, values in cfg.hparams.items():
        if key != "*" and key.lower() not in registry:
            raise ConfigError(f"--hparam {key}.*: unknown method {key!r}; known: {', '.join(sorted(registry))}")
        if key != "*":
            known = flatminima.get_method(key).defaults()
            bad = sorted(set(values) - set(known))
            if bad:
                raise ConfigError(f"--hparam: {key} has no hyperparameter {bad[0]!r}; its hyperparameters: {', '.join(known)}")
    if "*" in cfg.hparams:
        used = set()
        for m in methods:
            if m.sharpness_aware:
                used |= set(cfg.hparams["*"]) & set(flatminima.get_method(m.name).defaults())
        unused = sorted(set(cfg.hparams["*"]) - used)
        if unused:
            raise ConfigError(f"--hparam {unused[0]}=...: no method in this run has a hyperparameter {unused[0]!r}")
    for m in methods:
        optimizer_settings(m, cfg)  # raises on unknown options
    return methods


def optimizer_settings(method: Method, cfg: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(method_hparams, base_kwargs)`` for ``method`` under ``cfg``.

    Base kwargs: ``lr`` (``--lr``, else :func:`default_lr` of the optimizer), ``weight_decay``, ``momentum``/``nesterov`` where
    the optimizer takes them, then ``optimizer_args``, then inline options.
    Method hparams: the registry defaults, then ``hparams["*"]`` (keys the
    method has), ``hparams[name]``, then inline options.
    """
    cls = optimizer_class(method.optimizer)
    keys = _signature_keys(cls)
    base: dict[str, Any] = {"lr": cfg.lr if cfg.lr is not None else default_lr(method.optimizer)}
    if "weight_decay" in keys:
        base["weight_decay"] = cfg.weight_decay
    # --momentum/--nesterov must fit --optimizer; a plain optimizer of
    # another kind in the same comparison takes them only if it can.
    is_base = method.optimizer == cfg.optimizer.lower()
    momentum = cfg.momentum if cfg.momentum is not None else (0.9 if method.optimizer == "sgd" else None)
    if "momentum" in keys and momentum is not None:
        base["momentum"] = momentum
    elif cfg.momentum is not None and is_base:
        raise ConfigError(f"--momentum does not apply to {method.optimizer} (its arguments: {', '.join(sorted(keys))})")
    if cfg.nesterov and "nesterov" in keys:
        base["nesterov"] = True
    elif cfg.nesterov and is_base:
        raise ConfigError(f"--nesterov does not apply to {method.optimizer}")
    extra = cfg.optimizer_args if is_base else {k: v for k, v in cfg.optimizer_args.items() if k in keys}
    for k, v in extra.items():
        if k not in keys:
            raise ConfigError(f"--opt-arg {k}: {method.optimizer} has no argument {k!r}; its arguments: {', '.join(sorted(keys))}")
        check_base_argument(cls, k, v, "--opt-arg")
        base[k] = v
    hp: dict[str, Any] = {}
    known: dict[str, Any] = {}
    if method.sharpness_aware:
        known = flatminima.get_method(method.name).defaults()
        hp = dict(known)
        hp.update({k: v for k, v in cfg.hparams.get("*", {}).items() if k in known})
        hp.update(cfg.hparams.get(method.name, {}))
    for k, v in method.options.items():
        if k in known:
            hp[k] = v
        elif k in keys:
            check_base_argument(cls, k, v, f"method {method.label!r}:")
            base[k] = v
        else:
            what = f"hyperparameters: {', '.join(known)}; " if known else ""
            raise ConfigError(
                f"method {method.label!r}: unknown option {k!r} ({what}{method.optimizer} arguments: {', '.join(sorted(keys))})"
            )
    if cfg.min_lr > base["lr"]:
        raise ConfigError(f"--min-lr ({cfg.min_lr}) must not exceed the learning rate of {method.label!r} "
                          f"({base['lr']}); give a smaller --min-lr or a larger --lr")
    return hp, base


def build_optimizer(
    method: Method, model: nn.Module, cfg: ExperimentConfig, module: nn.Module | None = None
) -> Optimizer:
    """The optimizer of ``method`` over ``model``'s parameters. Sharpness-aware
    methods get ``model=`` (``module``, the DDP wrapper under torchrun) so that
    BatchNorm statistics come from the clean pass; without ``--m-sharpness``
    the clean gradient is averaged over the processes too (one eps per global
    batch: the same run as one process), with it each chunk gets its own."""
    hp, base = optimizer_settings(method, cfg)
    cls = optimizer_class(method.optimizer)
    try:
        params = model_params(cls, model)
        if method.plain:
            return cls(params, **base)
        spec = flatminima.get_method(method.name)
        if cfg.m_sharpness is not None and spec.cls.pre_pass:
            raise ConfigError(
                f"--m-sharpness does not apply to {method.name}: it perturbs from the base optimizer's momentum, "
                "before any pass, so every chunk would get the same eps; drop --m-sharpness for it"
            )
        changed = {k: v for k, v in hp.items() if spec.defaults().get(k, object()) != v}
        return flatminima.create(
            method.name, params, cls, model=model if module is None else module,
            sync_perturbations=cfg.m_sharpness is None, **changed, **base,
        )
    except (ValueError, TypeError) as e:  # cannot run on this model: compare goes on without it
        raise MethodFailed(f"method {method.label!r}: {e}") from None


def describe_method(method: Method, cfg: ExperimentConfig) -> dict[str, Any]:
    """What a method row ran with (for results.json)."""
    hp, base = optimizer_settings(method, cfg)
    out: dict[str, Any] = {"label": method.label, "name": method.name, "sharpness_aware": method.sharpness_aware,
                           "optimizer": method.optimizer, "optimizer_args": base}
    if method.sharpness_aware:
        spec = flatminima.get_method(method.name)
        out.update(hparams=hp, class_name=spec.cls.__name__, paper=spec.paper, passes_per_step=spec.passes_per_step)
    return out
