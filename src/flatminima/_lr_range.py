"""GSAM's radius schedule: ``rho_t`` follows the learning rate between ``lr_min`` and ``lr_max``.

The lr range of a group: ``lr_max`` as given, else the group's
``"initial_lr"`` (set by every torch LR scheduler), else the lr of the
first step (recorded in the group, so saved with the state dict);
``lr_min`` as given, else 0. :func:`set_lr_range` reads both from a torch
scheduler, for schedules whose peak is not ``initial_lr``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import Tensor
from torch.optim import lr_scheduler as S

#: group key holding the lr seen at the first step when no ``lr_max`` and no
#: scheduler's ``initial_lr`` is available (saved with the param groups)
RECORDED_LR_MAX = "recorded_lr_max"


def check_range(group: Mapping[str, Any]) -> None:
    """``rho_min <= rho`` and ``lr_min <= lr_max``, where given."""
    rho, rho_min, lr_max, lr_min = group["rho"], group["rho_min"], group["lr_max"], group["lr_min"]
    if rho_min is not None and rho_min > rho:
        raise ValueError(f"Invalid rho_min value: {rho_min} (must be <= rho = {rho})")
    if lr_max is not None and lr_min is not None and lr_min > lr_max:
        raise ValueError(f"Invalid lr_min value: {lr_min} (must be <= lr_max = {lr_max})")


def lr_range(group: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(lr_min, lr_max)`` the schedule of this group uses now."""
    lr_max = group["lr_max"]
    if lr_max is None:
        lr_max = group.get("initial_lr", group.get(RECORDED_LR_MAX))
    if lr_max is None:
        lr_max = group["lr"]  # first step: recorded after it
    lr_min = 0.0 if group["lr_min"] is None else group["lr_min"]
    return lr_min, lr_max

def current_rho(group: Mapping[str, Any]) -> float | Tensor:
    """The radius ``rho_t`` a step would use now in ``group`` (for logging)."""
    rho, rho_min = group["rho"], group["rho_min"]
    if rho_min is None:
        return rho
    lr_min, lr_max = lr_range(group)
    if lr_max == lr_min:
        return rho
    if lr_max < lr_min:
        raise ValueError(
            f"GSAM: lr_max ({float(lr_max)}) is below lr_min ({float(lr_min)}) in a param group; "
            "pass lr_max= and lr_min= (or call set_lr_range(scheduler))"
        )
    ratio = (group["lr"] - lr_min) / (lr_max - lr_min)
    ratio = ratio.clamp(0.0, 1.0) if isinstance(ratio, Tensor) else min(max(ratio, 0.0), 1.0)
    return rho_min + (rho - rho_min) * ratio

def set_lr_range(opt: Any, scheduler: Any) -> list[tuple[float, float]]:
    """Set ``lr_min``/``lr_max`` of every group from a torch LR scheduler.

    Known: ``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``
    (``eta_min``), ``LinearLR``, ``ConstantLR`` (start/end factors),
    ``OneCycleLR`` (``max_lr``, ``min_lr``), ``CyclicLR`` (``base_lr``,
    ``max_lr``), ``PolynomialLR``, ``StepLR``, ``MultiStepLR``,
    ``ExponentialLR`` (``lr_min = 0``: their floor depends on the run's
    length), ``ReduceLROnPlateau`` (the current lr and ``min_lr``) and
    ``SequentialLR`` (the union of its schedulers' ranges). Call it once,
    right after building the scheduler. Returns the ``(lr_min, lr_max)``
    of each group. Other schedulers raise TypeError: pass ``lr_max=`` and
    ``lr_min=`` to GSAM instead.
    """
    optimizer = getattr(scheduler, "optimizer", None)
    if optimizer is None or optimizer.param_groups is not opt.param_groups:
        raise ValueError("set_lr_range: the scheduler does not drive this optimizer (or its base optimizer)")
    ranges = _scheduler_ranges(scheduler)
    for group, (lo, hi) in zip(opt.param_groups, ranges):
        update = {**group, "lr_min": lo, "lr_max": hi}
        opt._check_group(update)
        group["lr_min"], group["lr_max"] = lo, hi
    return ranges


def record_lr_max(group: dict[str, Any]) -> None:
    """After the first step: remember its lr where nothing else gives ``lr_max``."""
    if group["rho_min"] is None or group["lr_max"] is not None:
        return
    if "initial_lr" in group or RECORDED_LR_MAX in group:
        return
    lr = group["lr"]
    group[RECORDED_LR_MAX] = float(lr.item() if isinstance(lr, Tensor) else lr)


def _as_float(value: Any) -> float:
    return float(value.item() if isinstance(value, Tensor) else value)


def _scheduler_ranges(scheduler: Any) -> list[tuple[float, float]]:
    """Per-group ``(lr_min, lr_max)`` a torch LR scheduler moves the lr within."""
    groups = scheduler.optimizer.param_groups
    base = [_as_float(b) for b in getattr(scheduler, "base_lrs", [])]

    def factors(low: float, high: float) -> list[tuple[float, float]]:
        return [(b * min(low, high), b * max(low, high)) for b in base]

    if isinstance(scheduler, (S.CosineAnnealingLR, S.CosineAnnealingWarmRestarts)):
        return [(min(scheduler.eta_min, b), max(scheduler.eta_min, b)) for b in base]
    if isinstance(scheduler, S.LinearLR):
        return factors(scheduler.start_factor, scheduler.end_factor)
    if isinstance(scheduler, S.ConstantLR):
        return factors(scheduler.factor, 1.0)
    if isinstance(scheduler, S.OneCycleLR):
        return [(_as_float(g["min_lr"]), _as_float(g["max_lr"])) for g in groups]
    if isinstance(scheduler, S.CyclicLR):
        return [(b, _as_float(m)) for b, m in zip(base, scheduler.max_lrs)]
    if isinstance(scheduler, (S.PolynomialLR, S.StepLR, S.MultiStepLR, S.ExponentialLR)):
        return [(0.0, b) for b in base]
    if isinstance(scheduler, S.ReduceLROnPlateau):
        return [(_as_float(m), _as_float(g["lr"])) for m, g in zip(scheduler.min_lrs, groups)]
    if isinstance(scheduler, S.SequentialLR):
        parts = [_scheduler_ranges(s) for s in scheduler._schedulers]
        return [(min(r[i][0] for r in parts), max(r[i][1] for r in parts)) for i in range(len(groups))]
    raise TypeError(
        f"set_lr_range does not know the lr range of {type(scheduler).__name__}; "
        "pass lr_max= and lr_min= to GSAM instead"
    )
