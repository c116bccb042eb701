"""The base optimizer, the param groups both optimizers share, the state dict.

A sharpness-aware optimizer wraps an ordinary one (a class it builds over
its own param groups, or an instance built over the same parameters). Both
read one list of group dicts: LR schedulers, per-group ``rho`` and
``add_param_group`` act on both at once. The state dict holds everything a
resumed run needs to continue bit for bit: the base optimizer's state, the
method's per-parameter and method-level state, its method-wide options and
the step counters.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _sharding, _stacks
from ._options import Option

_FORMAT = 1


class Wrapped(Optimizer):
    """An optimizer whose steps are taken by ``self.base_optimizer``."""

    #: per-group options of the method: name -> Option
    group_options: ClassVar[Mapping[str, Option]] = {}
    #: method-wide options saved by ``state_dict`` and restored on load
    method_options: ClassVar[tuple[str, ...]] = ("max_grad_norm", "sync_perturbations")
    #: the parameters' sharding (FSDP1, FSDP2; ``_sharding.detect``), None for whole tensors
    _shards: _sharding.Shards | None = None
    #: per group (by id), the option values last checked: a step re-checks only what changed
    _checked: dict[int, list[tuple[type, Any]]]

    def _wrap(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        defaults: dict[str, Any],
        base_kwargs: dict[str, Any],
    ) -> None:
        self._method_defaults = dict(defaults)
        for key, value in defaults.items():
            self._check_value(key, value)
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of Tensors or dicts, got a single Tensor")
        params_list: list[Any] = list(params)
        is_class = isinstance(base_optimizer, type) and issubclass(base_optimizer, Optimizer)
        if isinstance(base_optimizer, Wrapped) or (is_class and issubclass(base_optimizer, Wrapped)):  # type: ignore[arg-type]
            raise TypeError(f"base_optimizer must be an ordinary optimizer, not the sharpness-aware {base_optimizer!r}")
        if not is_class and not isinstance(base_optimizer, Optimizer):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer subclass (e.g. torch.optim.SGD) "
                f"or an optimizer instance, got {base_optimizer!r}"
            )
        if not is_class and base_kwargs:
            raise TypeError(
                f"base optimizer keyword arguments {sorted(base_kwargs)} were given with an optimizer "
                "instance; set them when building the instance, or pass its class instead"
            )
        base_cls = base_optimizer if is_class else type(base_optimizer)
        _check_drivable(type(self).__name__, base_cls)  # type: ignore[arg-type]
        if is_class:
            self._check_base_kwargs(base_cls, base_kwargs)  # type: ignore[arg-type]
        Optimizer.__init__(self, params_list, dict(defaults))
        self.base_optimizer: Optimizer = (
            base_optimizer(self.param_groups, **base_kwargs) if is_class else base_optimizer  # type: ignore[assignment,operator]
        )
        # Both optimizers read one dict per group: a key both define would
        # silently set the other's option (Adadelta's rho, RMSprop's alpha).
        shared = sorted(set(self._method_defaults) & set(self.base_optimizer.defaults))
        if shared:
            raise ValueError(
                f"{type(self).__name__} cannot wrap {base_cls.__name__}: both use the param-group "  # type: ignore[union-attr]
                f"option(s) {shared}, and the two optimizers share their param groups"
            )
        if not is_class:
            self._adopt_instance_groups(params_list)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = {**self.base_optimizer.defaults, **self._method_defaults}
        self._shards = _sharding.detect(getattr(self, "model", None), self._all_params())
        for group in self.param_groups:
            self._check_group(group)
        self.counters: dict[str, int] = {"steps": 0, "perturbed_steps": 0, "skipped_steps": 0}
        #: method-level (not per-parameter) state, saved in the state dict
        self.method_state: dict[str, Any] = {}

    def _check_base_kwargs(self, base_cls: type[Optimizer], base_kwargs: Mapping[str, Any]) -> None:
        """Keywords that neither this method nor ``base_cls`` takes: a TypeError
        naming both sets of options (not the base constructor's own error, which
        would blame the base optimizer for a misspelt method option)."""
        taken = _arguments(base_cls)
        unknown = [] if taken is None else [k for k in base_kwargs if k not in taken]
        if not unknown:
            return
        name, ours = type(self).__name__, [*self.group_options, *getattr(self, "wide_options", {})]
        theirs = [k for k in taken or [] if k not in ours]  # a name both take is ours (foreach)
        raise TypeError(
            f"{name} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}: neither an option of "
            f"{name} ({', '.join(ours)}) nor an argument of its base optimizer {base_cls.__name__} ({', '.join(theirs)})"
        )

    # ------------------------------------------------------------------ groups
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_value(self, key: str, value: Any) -> None:
        option = self.group_options.get(key)
        if option is not None:
            option.check(key, value)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        # each step re-checks the group (a value set by hand since is refused before it is used);
        # values already checked are skipped: same type and equal (NaN never equals: checked again)
        seen = [(type(v), v) for v in map(group.__getitem__, self._method_defaults)]
        if self.__dict__.setdefault("_checked", {}).get(id(group)) != seen:
            for key in self._method_defaults:
                self._check_value(key, group[key])
            self._checked[id(group)] = seen
        _sharding.check_group(self, group)  # under FSDP1: no part that needs whole tensors

    def _adopt_instance_groups(self, user_params: list[Any]) -> None:
        """Put our hyperparameters into an existing optimizer's groups."""
        ours = {id(p) for p in self._all_params()}
        theirs = {id(p) for g in self.base_optimizer.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError(
                "base_optimizer instance does not hold the same parameters as `params`: "
                f"{len(ours - theirs)} given parameter(s) are not in it and {len(theirs - ours)} of its "
                "parameter(s) were not given"
            )
        for group in self.base_optimizer.param_groups:
            for key, value in self._method_defaults.items():
                group.setdefault(key, value)
        for user_group in user_params:
            if not isinstance(user_group, dict):
                continue
            options = {k: v for k, v in user_group.items() if k != "params"}
            ids = {id(p) for p in _as_list(user_group["params"])}
            match = [g for g in self.base_optimizer.param_groups if {id(p) for p in g["params"]} == ids]
            if not match:
                raise ValueError(
                    f"param group with options {sorted(options)} does not match any param group "
                    "of the base_optimizer instance"
                )
            match[0].update(options)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, got {type(param_group).__name__}")
        params = param_group.get("params", [])
        if not isinstance(params, (Tensor, list, tuple, set)):
            params = param_group["params"] = list(params)  # a generator: read it once
        for p in [params] if isinstance(params, Tensor) else params:
            if isinstance(p, Tensor) and p.is_complex():
                raise TypeError(f"{type(self).__name__} does not support complex parameters (got {p.dtype})")
        if "base_optimizer" not in self.__dict__:  # during Optimizer.__init__
            super().add_param_group(param_group)
            return
        for key, value in self._method_defaults.items():
            param_group.setdefault(key, value)
        shards = _sharding.detect(getattr(self, "model", None), [*self._all_params(), *_as_list(param_group["params"])])
        if shards != self._shards:
            raise ValueError(
                f"add_param_group: the new parameters are sharded otherwise ({shards and shards.kind}) than the "
                f"optimizer's ({self._shards and self._shards.kind}); shard the whole model the same way first"
            )
        self._check_group(param_group)
        self.base_optimizer.add_param_group(param_group)  # appends to the shared list

    # ------------------------------------------------------------------ counters
    @property
    def skipped_steps(self) -> int:
        """Steps skipped because a gradient was non-finite."""
        return self.counters["skipped_steps"]

    @property
    def step_count(self) -> int:
        """Steps the base optimizer has taken through this optimizer."""
        return self.counters["steps"]

    @property
    def perturbed_steps(self) -> int:
        """Steps that ran the perturbed pass."""
        return self.counters["perturbed_steps"]

    # ------------------------------------------------------------------ state
    def _between_steps(self, what: str) -> None:
        """Raise when a step is open (overridden by the protocol)."""

    def _identity(self) -> str:
        """The method's name in state dicts."""
        return type(self).__name__

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-for-bit: the base optimizer's state,
        this method's per-parameter and method-level state, its method-wide
        options (:attr:`method_options`, restored on load as param-group
        hyperparameters are) and the counters.
        Readable with ``torch.load(..., weights_only=True)``."""
        _stacks.refuse_dcp_helpers(type(self).__name__)  # they would keep "state" alone: {} (no momentum)
        self._between_steps("state_dict()")
        own = super().state_dict()
        return {
            "state": own["state"],
            "param_groups": own["param_groups"],
            "base": self.base_optimizer.state_dict(),
            "flatminima": {
                "format": _FORMAT,
                "method": self._identity(),
                "shapes": [list(p.shape) for p in self._all_params()],
                "counters": dict(self.counters),
                "method_state": _copy_state(self.method_state),
                "options": {name: getattr(self, name) for name in self.method_options},
            },
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Load a state dict saved by :meth:`state_dict` (of this method). Every
        option it holds passes the constructor's checks first, and the load is
        all or nothing: a state dict that does not load raises ValueError or
        TypeError and leaves the optimizer exactly as it was."""
        _stacks.refuse_dcp_helpers(type(self).__name__)
        meta = self._check_loadable(state_dict)
        self._between_steps("")
        before = copy.deepcopy(self.state_dict())
        try:
            self._load(state_dict, meta)
        except Exception as err:
            self._load(before, before["flatminima"])
            if isinstance(err, (ValueError, TypeError)):
                raise
            raise ValueError(f"{type(self).__name__}: the state dict does not load ({type(err).__name__}: {err})") from err

    def _load(self, state_dict: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # loading replaced both lists: share again
        self.counters = dict(meta["counters"])
        self.method_state = _copy_state(meta["method_state"])
        for name, value in meta.get("options", {}).items():  # absent in state dicts of earlier versions
            if name in self.method_options:
                setattr(self, name, value)

    def _check_loadable(self, state_dict: Any) -> Mapping[str, Any]:
        """The state dict's flatminima record, after every check a constructor
        would make of what it holds (before anything is changed)."""
        meta = state_dict.get("flatminima") if isinstance(state_dict, Mapping) else None
        if not isinstance(meta, Mapping) or "base" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() expects a state dict saved by a flatminima optimizer; "
                "to load a plain optimizer's state use .base_optimizer.load_state_dict()"
            )
        if not isinstance(meta.get("method"), str) or meta["method"] != self._identity():
            raise ValueError(
                f"state dict was saved by {meta.get('method')!r}, cannot load it into {self._identity()!r}"
            )
        if type(meta.get("format")) is not int or meta["format"] != _FORMAT:
            raise ValueError(f"unsupported flatminima state dict format {meta.get('format')!r} (expected {_FORMAT})")
        shapes = [list(p.shape) for p in self._all_params()]
        saved = meta.get("shapes")
        if not isinstance(saved, (list, tuple)) or not all(
            isinstance(s, (list, tuple)) and all(isinstance(n, int) and not isinstance(n, bool) for n in s) for s in saved
        ):
            raise ValueError(f"state dict has no valid parameter shapes (lists of ints), got {saved!r}")
        if len(saved) != len(shapes):
            raise ValueError(f"state dict holds {len(saved)} parameters, this optimizer has {len(shapes)}")
        for i, (a, b) in enumerate(zip(saved, shapes)):
            if list(a) != b:
                raise ValueError(f"parameter {i} has shape {b} here but {list(a)} in the state dict")
        self._check_loaded_groups(state_dict.get("param_groups"))
        base = state_dict["base"]
        if not isinstance(base, Mapping) or not isinstance(base.get("param_groups"), (list, tuple)):
            raise ValueError("the state dict's base optimizer part has no param groups")
        for i, (saved, here) in enumerate(zip(base["param_groups"], self.base_optimizer.param_groups)):
            lost = sorted(k for k in here if k != "params" and (not isinstance(saved, Mapping) or k not in saved))
            if lost:
                raise ValueError(f"param group {i} of the base optimizer's state dict lacks {lost}")
            # The base's groups are the ones in effect after a load: the same checks, and the same values
            self._check_group({**{k: v for k, v in here.items() if k != "params"}, **saved})
            top = state_dict["param_groups"][i]
            for name in self._method_defaults:
                if not _same_value(saved[name], top[name]):
                    raise ValueError(
                        f"state dict has {name}={saved[name]!r} in the base optimizer's param group {i} but "
                        f"{top[name]!r} in its own: it was edited by hand; make them agree"
                    )
        self._check_loaded_meta(meta)
        return meta

    def _check_loaded_groups(self, groups: Any) -> None:
        if not isinstance(groups, (list, tuple)) or len(groups) != len(self.param_groups):
            got = len(groups) if isinstance(groups, (list, tuple)) else repr(groups)
            raise ValueError(
                f"loaded state dict has a different number of parameter groups ({got}) than this optimizer "
                f"({len(self.param_groups)})"
            )
        for i, (saved, here) in enumerate(zip(groups, self.param_groups)):
            if not isinstance(saved, Mapping):
                raise TypeError(f"param group {i} of the state dict is a {type(saved).__name__}, not a dict")
            missing = [k for k in self._method_defaults if k not in saved]
            if missing:
                raise ValueError(f"param group {i} of the state dict lacks the option(s) {missing}")
            self._check_group({**{k: v for k, v in here.items() if k != "params"}, **saved})
            for name in self._method_defaults:  # a flag names the method (adaptive: ASAM, centralize: GCSAM)
                option = self.group_options.get(name)
                if option is not None and isinstance(option.default, bool) and saved[name] is not here[name]:
                    raise ValueError(
                        f"state dict was saved with {name}={saved[name]!r} in param group {i}; this optimizer has "
                        f"{name}={here[name]!r}, another method: build it with {name}={saved[name]!r} to resume that run"
                    )

    def _check_loaded_meta(self, meta: Mapping[str, Any]) -> None:
        counters = meta.get("counters")
        keys = ("steps", "perturbed_steps", "skipped_steps")
        if not isinstance(counters, Mapping) or any(
            isinstance(counters.get(k), bool) or not isinstance(counters.get(k), int) or counters[k] < 0 for k in keys
        ):
            raise ValueError(f"state dict counters must be non-negative ints {list(keys)}, got {counters!r}")
        state = meta.get("method_state")
        if not isinstance(state, Mapping):
            raise TypeError(f"state dict method_state must be a dict, got {type(state).__name__}")
        for key, value in self.method_state.items():
            if key in state and not _same_kind(state[key], value):
                raise TypeError(f"state dict method_state[{key!r}] is {state[key]!r}, expected a {type(value).__name__}")
        options = meta.get("options", {})
        if not isinstance(options, Mapping):
            raise TypeError(f"state dict options must be a dict, got {type(options).__name__}")
        checks = getattr(self, "wide_options", {})
        for name, value in options.items():
            if name in self.method_options and name in checks:
                checks[name].check(name, value)


def _check_drivable(owner: str, base_cls: type[Optimizer]) -> None:
    """Refuse, at construction, a base optimizer that a sharpness-aware step cannot drive: it hands
    the base optimizer one dense direction in ``.grad`` and calls ``step()`` without a closure."""
    if issubclass(base_cls, torch.optim.SparseAdam):
        raise TypeError(
            f"{owner} cannot wrap {base_cls.__name__}: it takes sparse gradients only, and a sharpness-aware "
            "step works on dense ones (it builds w + eps from them); use Adam or AdamW (with nn.Embedding, sparse=False)"
        )
    closure = inspect.signature(base_cls.step).parameters.get("closure")
    if closure is not None and closure.default is inspect.Parameter.empty:
        raise TypeError(
            f"{owner} cannot wrap {base_cls.__name__}: its step() needs a closure of its own (it re-evaluates the "
            "loss, as LBFGS's line search does), while a sharpness-aware step hands its base optimizer one "
            "direction in .grad and calls step() without a closure; use a first-order optimizer (SGD, Adam, ...)"
        )


def _arguments(base_cls: type[Optimizer]) -> list[str] | None:
    """The keyword arguments ``base_cls(params, ...)`` takes; None: any (``**kwargs``) or unknown."""
    try:
        params = inspect.signature(base_cls.__init__).parameters
    except (TypeError, ValueError):  # a constructor without a readable signature: let it check itself
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [n for n, p in params.items() if n not in ("self", "params") and p.kind in kinds]


def _same_kind(a: Any, b: Any) -> bool:
    """Whether a loaded value ``a`` can stand where ``b`` stood (numbers for numbers, not bools)."""
    if isinstance(b, bool) or isinstance(a, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    if isinstance(b, int):  # counts (steps, seeds)
        return isinstance(a, int)
    if isinstance(b, float):  # running statistics
        return isinstance(a, (int, float)) and math.isfinite(a)
    return a is None or b is None or isinstance(a, type(b))


def _same_value(a: Any, b: Any) -> bool:
    return a is b or type(a) is type(b) and (a == b or a != a and b != b)  # NaN equals NaN here


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


