"""Muon for the 2-D weights of hidden layers, AdamW for the rest: one optimizer.

``torch.optim.Muon`` takes 2-D parameters only, and its documentation
recommends it for the weights of hidden layers alone: the input layer (or
embedding), the head, biases and normalisation parameters go to a standard
method such as AdamW. :class:`MuonAdamW` is that pair as one
``torch.optim.Optimizer``, so that it can stand wherever one optimizer is
expected: under an LR scheduler, in a checkpoint, and as the base optimizer
of a sharpness-aware method::

    groups = flatminima.muon_param_groups(model)                 # use_muon=True / False
    opt = flatminima.MuonAdamW(groups, lr=1e-3, weight_decay=0.1)
    sam = flatminima.SAM(flatminima.muon_param_groups(model), flatminima.MuonAdamW, rho=0.05, lr=1e-3)

Each param group says which optimizer steps it with ``use_muon`` (as in
Keller Jordan's ``MuonWithAuxAdam``). The groups are the two optimizers'
own: the same dict objects are in ``self.param_groups`` and in the inner
``torch.optim.Muon`` / ``torch.optim.AdamW``, and so is the per-parameter
state, so an LR scheduler (or a sharpness-aware method sharing the groups)
reaches both, and ``state_dict()`` / ``load_state_dict()`` are those of one
optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import AdamW, Optimizer

from .param_groups import split_param_groups

def muon_param_groups(model: nn.Module) -> list[dict[str, Any]]:
    """``model``'s parameters as :class:`MuonAdamW` groups: the 2-D weights of
    hidden layers with ``use_muon=True``, the rest (first and last layer,
    biases, normalisation parameters, convolution weights) with
    ``use_muon=False`` (see :func:`~flatminima.split_param_groups`, ``rule="muon"``).

    >>> from torch import nn
    >>> model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    >>> [(len(g["params"]), g["use_muon"]) for g in muon_param_groups(model)]
    [(1, True), (7, False)]
    """
    return split_param_groups(model, rule="muon", weights={"use_muon": True}, others={"use_muon": False})


class MuonAdamW(Optimizer):
    """``torch.optim.Muon`` on the groups with ``use_muon=True`` (2-D parameters
    only), ``torch.optim.AdamW`` on those with ``use_muon=False``.

    Args:
        params: param groups, each with ``use_muon`` (True or False); build
            them with :func:`muon_param_groups`. At least one parameter must
            go to Muon (else use AdamW).
        lr: learning rate of both (default 1e-3).
        weight_decay: decoupled weight decay of both (default 0.1).
        momentum, nesterov, ns_coefficients, eps, ns_steps: Muon's
            (``torch.optim.Muon``'s defaults).
        adjust_lr_fn: Muon's learning-rate adjustment; default
            ``"match_rms_adamw"`` (Moonshot's): Muon's update gets the RMS of
            AdamW's, so the one ``lr`` and ``weight_decay`` serve both parts.
            ``"original"`` is Keller Jordan's (then give Muon's groups their
            own ``lr``).
        adamw_betas, adamw_eps: AdamW's ``betas`` and ``eps``.

    A group may set any option of its optimizer (``{"params": ..., "use_muon":
    False, "betas": (0.9, 0.95)}``); groups hold the options of the optimizer
    that steps them.
    """

    def __init__(
        self,
        params: Iterable[dict[str, Any]],
        lr: float = 1e-3,
        weight_decay: float = 0.1,
        momentum: float = 0.95,
        nesterov: bool = True,
        ns_coefficients: tuple[float, float, float] = (3.4445, -4.775, 2.0315),
        eps: float = 1e-7,
        ns_steps: int = 5,
        adjust_lr_fn: str | None = "match_rms_adamw",
        adamw_betas: tuple[float, float] = (0.9, 0.999),
        adamw_eps: float = 1e-8,
    ) -> None:
        muon_cls = getattr(torch.optim, "Muon", None)
        if muon_cls is None:
            raise TypeError(f"MuonAdamW needs torch.optim.Muon (torch >= 2.9); this is torch {torch.__version__}")
        if isinstance(params, Tensor):
            raise TypeError("MuonAdamW takes param groups marked use_muon=True/False, got a single Tensor; "
                            "build them with flatminima.muon_param_groups(model)")
        groups = list(params)
        for i, group in enumerate(groups):
            self._check_marked(group, f"param group {i}")
            groups[i] = {**group, "params": _as_list(group["params"])}  # a generator is read once, here
        if not any(g["use_muon"] and list(_as_list(g["params"])) for g in groups):
            raise ValueError("MuonAdamW: no parameter has use_muon=True, so Muon would step nothing; the model has no "
                             "2-D weights in hidden layers (Muon takes only those): use AdamW instead")
        self._muon_cls: type[Optimizer] = muon_cls
        self._muon_args: dict[str, Any] = {
            "lr": lr, "weight_decay": weight_decay, "momentum": momentum, "nesterov": nesterov,
            "ns_coefficients": ns_coefficients, "eps": eps, "ns_steps": ns_steps, "adjust_lr_fn": adjust_lr_fn,
        }
        self._adamw_args: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay, "betas": adamw_betas, "eps": adamw_eps}
        self._inner: dict[bool, Optimizer] = {}  # use_muon -> the optimizer stepping those groups
        defaults = {**self._muon_args, "adamw_betas": adamw_betas, "adamw_eps": adamw_eps}
        super().__init__(groups, defaults)

    # ------------------------------------------------------------------ groups
    @staticmethod
    def _check_marked(group: Any, what: str) -> None:
        if not isinstance(group, dict):
            raise TypeError(f"MuonAdamW takes param groups (dicts with use_muon=True or False), got a "
                            f"{type(group).__name__}; build them with flatminima.muon_param_groups(model)")
        if not isinstance(group.get("use_muon"), bool):
            raise TypeError(f"MuonAdamW: {what} needs use_muon=True (Muon) or False (AdamW), got "
                            f"{group.get('use_muon')!r}; build the groups with flatminima.muon_param_groups(model)")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (with ``use_muon``) to Muon or AdamW; its dict is shared, not copied."""
        self._check_marked(param_group, "the param group")
        param_group["params"] = _as_list(param_group["params"])
        ids = {id(p) for p in param_group["params"]}
        if any(id(p) in ids for g in self.param_groups for p in g["params"]):
            raise ValueError("some parameters appear in more than one parameter group")
        use_muon = param_group["use_muon"]
        if use_muon:
            for p in param_group["params"]:
                if not isinstance(p, Tensor) or p.dim() != 2:
                    shape = list(p.shape) if isinstance(p, Tensor) else type(p).__name__
                    raise ValueError(f"MuonAdamW: Muon takes only 2-D parameters, got one of shape {shape} in a group "
                                     "with use_muon=True; give it use_muon=False (AdamW)")
        inner = self._inner.get(use_muon)
        if inner is None:  # the first group of its kind builds the optimizer, over this very dict
            cls = self._muon_cls if use_muon else AdamW
            inner = self._inner[use_muon] = cls([param_group], **(self._muon_args if use_muon else self._adamw_args))
            inner.state = self.state  # one state for both (their parameters are disjoint)
        else:
            inner.add_param_group(param_group)
        self.param_groups.append(param_group)

    # ------------------------------------------------------------------ steps and state
    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        """One step of Muon and of AdamW, each over its own groups."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for inner in self._inner.values():
            inner.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load as one optimizer, then hand each inner optimizer the new group
        dicts and state (``Optimizer.load_state_dict`` replaces both)."""
        saved = state_dict.get("param_groups") if isinstance(state_dict, dict) else None
        if isinstance(saved, list):
            for i, (group, here) in enumerate(zip(saved, self.param_groups)):
                if not isinstance(group, dict) or group.get("use_muon") is not here["use_muon"]:
                    got = group.get("use_muon") if isinstance(group, dict) else type(group).__name__
                    raise ValueError(f"MuonAdamW: param group {i} of the state dict has use_muon={got!r}, this "
                                     f"optimizer's has {here['use_muon']!r}: the state dict splits the parameters "
                                     "differently")
        super().load_state_dict(state_dict)
        for use_muon, inner in self._inner.items():
            inner.param_groups = [g for g in self.param_groups if g["use_muon"] is use_muon]
            inner.state = self.state


def _as_list(params: Any) -> list[Any]:
    return [params] if isinstance(params, Tensor) else list(params)
