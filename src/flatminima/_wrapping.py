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

from collections.abc import Iterable, Mapping
from typing import Any, ClassVar


from torch import Tensor
from torch.optim import Optimizer

from ._options import Option

_FORMAT = 1


class Wrapped(Optimizer):
    """An optimizer whose steps are taken by ``self.base_optimizer``."""

    #: per-group options of the method: name -> Option
    group_options: ClassVar[Mapping[str, Option]] = {}
    #: method-wide options saved by ``state_dict`` and restored on load
    method_options: ClassVar[tuple[str, ...]] = ("max_grad_norm", "sync_perturbations")

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
        Optimizer.__init__(self, params_list, dict(defaults))
        base_cls = base_optimizer if is_class else type(base_optimizer)
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
        for group in self.param_groups:
            self._check_group(group)
        self.counters: dict[str, int] = {"steps": 0, "perturbed_steps": 0, "skipped_steps": 0}
        #: method-level (not per-parameter) state, saved in the state dict
        self.method_state: dict[str, Any] = {}

    # ------------------------------------------------------------------ groups
    def _all_params(self) -> list[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _check_value(self, key: str, value: Any) -> None:
        option = self.group_options.get(key)
        if option is not None:
            option.check(key, value)

    def _check_group(self, group: Mapping[str, Any]) -> None:
        for key in self._method_defaults:
            self._check_value(key, group[key])

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
        meta = state_dict.get("flatminima") if isinstance(state_dict, Mapping) else None
        if not isinstance(meta, Mapping) or "base" not in state_dict:
            raise ValueError(
                f"{type(self).__name__}.load_state_dict() expects a state dict saved by a flatminima optimizer; "
                "to load a plain optimizer's state use .base_optimizer.load_state_dict()"
            )
        if meta.get("method") != self._identity():
            raise ValueError(
                f"state dict was saved by {meta.get('method')!r}, cannot load it into {self._identity()!r}"
            )
        if meta.get("format") != _FORMAT:
            raise ValueError(f"unsupported flatminima state dict format {meta.get('format')!r} (expected {_FORMAT})")
        shapes = [list(p.shape) for p in self._all_params()]
        saved = [list(s) for s in meta["shapes"]]
        if len(saved) != len(shapes):
            raise ValueError(f"state dict holds {len(saved)} parameters, this optimizer has {len(shapes)}")
        for i, (a, b) in enumerate(zip(saved, shapes)):
            if a != b:
                raise ValueError(f"parameter {i} has shape {b} here but {a} in the state dict")
        self._between_steps("")
        super().load_state_dict({"state": state_dict["state"], "param_groups": state_dict["param_groups"]})
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.param_groups = self.base_optimizer.param_groups  # loading replaced both lists: share again
        self.counters = dict(meta["counters"])
        self.method_state = _copy_state(meta["method_state"])
        for name, value in meta.get("options", {}).items():  # absent in state dicts of earlier versions
            if name in self.method_options:
                setattr(self, name, value)


def _as_list(params: Any) -> list[Tensor]:
    return [params] if isinstance(params, Tensor) else list(params)


def _copy_state(state: Mapping[str, Any]) -> dict[str, Any]:
    return {k: (v.clone() if isinstance(v, Tensor) else v) for k, v in state.items()}


