"""Distributed checkpoints (``torch.distributed.checkpoint``, DCP) of a sharpness-aware optimizer.

torch's ``get_optimizer_state_dict`` / ``set_optimizer_state_dict`` read one
optimizer's ``state`` and ``param_groups`` and initialise a fresh one with
``step()`` at lr 0 and zero gradients. A sharpness-aware optimizer keeps its
per-parameter state in two (the base optimizer's momentum, the method's own
``g_v``, ``m``, ``d``) and its step needs a closure, so those helpers are
refused with a TypeError (``_stacks.refuse_dcp_helpers``) and these two take
their place, with the same arguments::

    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
    from flatminima.distributed import get_optimizer_state_dict, set_optimizer_state_dict

    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=path)
    # resume: a fresh model and optimizer, built as before
    sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
    dcp.load(sd, checkpoint_id=path)
    set_model_state_dict(model, sd["model"])
    set_optimizer_state_dict(model, opt, sd["optim"])

The state dict, keyed by parameter FQNs (those of ``get_model_state_dict``)::

    {"state":  {fqn: {key: value}},  # the base optimizer's (momentum, Adam's moments and step): DTensor shards under FSDP2
     "method": {fqn: {key: value}},  # the method's own per-parameter state (Part.param_state)
     "flatminima": bytes}            # the rest, one record: param groups, counters, method-level state, options

``dcp.load`` fills only what the fresh optimizer's state dict names, so the
layout must not depend on when it is taken: state not held yet (before the
first step, a parameter that never had a gradient) is a placeholder, recorded
as one. The base optimizer's placeholders come from one step at lr 0 with
zero gradients on those parameters alone, after which the parameters,
gradients, learning rates and the base's state are put back as they were
(torch's helpers keep that step: Adam's step count would move). The record is
one value (a ``bytes`` of ``torch.save``, read with ``weights_only=True``), so
that state a method creates later (LookSAM's ``g_v_norm``) is loaded whole.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from . import _replicas, _sharding
from ._base import SharpnessAware

__all__ = ["get_optimizer_state_dict", "set_optimizer_state_dict"]

_FORMAT = 1
_SECTIONS = ("state", "method")


def get_optimizer_state_dict(model: nn.Module, optimizers: SharpnessAware) -> dict[str, Any]:
    """The optimizer's state dict for ``torch.distributed.checkpoint.save``, keyed by the FQNs of
    ``model``'s parameters: the base optimizer's state, the method's per-parameter and method-level
    state, the counters, options and param groups. Collective: call it on every rank. It changes
    nothing in the run. Its tensors are the optimizer's own (no copy): ``dcp.load`` into it writes
    into them in place."""
    opt = _check(model, optimizers)
    names = _names(model, opt)
    regular = opt.state_dict()  # everything a resumed run needs, with its checks (not during a step)
    _check_base_layout(opt, regular["base"], len(names))
    params = opt._all_params()
    base_state: Mapping[int, Mapping[str, Any]] = regular["base"]["state"]
    own_state: Mapping[int, Mapping[str, Any]] = regular["state"]
    probed = _base_placeholders(opt.base_optimizer, [p for i, p in enumerate(params) if p.requires_grad and i not in base_state])
    declared = sorted({key for part in type(opt).parts() for key in part.param_state})
    state: dict[str, dict[str, Any]] = {}
    method: dict[str, dict[str, Any]] = {}
    held: dict[str, dict[str, list[str]]] = {"state": {}, "method": {}}
    for i, (p, name) in enumerate(zip(params, names)):
        if i in base_state:
            state[name] = dict(base_state[i])
            held["state"][name] = sorted(base_state[i])
        elif p.requires_grad:
            state[name] = probed[id(p)]
        method[name] = dict(own_state.get(i, {}))
        if i in own_state:
            held["method"][name] = sorted(own_state[i])
        if p.requires_grad:
            for key in declared:
                if key not in method[name]:
                    method[name][key] = torch.zeros_like(p)
    record = {
        "format": _FORMAT,
        "params": names,
        "param_groups": _named(regular["param_groups"], names),
        "base_param_groups": _named(regular["base"]["param_groups"], names),
        "flatminima": regular["flatminima"],
        "held": held,
        "saved": {"state": {n: sorted(s) for n, s in state.items()}, "method": {n: sorted(s) for n, s in method.items()}},
    }
    buffer = io.BytesIO()
    torch.save(record, buffer)
    blob = buffer.getvalue()
    _check_replicated(opt, model, blob, state, method)
    return {"state": state, "method": method, "flatminima": blob}


def set_optimizer_state_dict(model: nn.Module, optimizers: SharpnessAware, optim_state_dict: Mapping[str, Any]) -> None:
    """Load ``optim_state_dict``: a state dict of :func:`get_optimizer_state_dict` that
    ``torch.distributed.checkpoint.load`` filled. Every check of ``opt.load_state_dict`` applies
    and the load is all or nothing (a ValueError or TypeError leaves the optimizer as it was)."""
    opt = _check(model, optimizers)
    names = _names(model, opt)
    record = _read_record(optim_state_dict)
    if record["params"] != names:
        raise ValueError(_differ(record["params"], names))
    for section in _SECTIONS:
        loaded = optim_state_dict[section]
        for name in names:
            saved, here = record["saved"][section].get(name, []), sorted(loaded.get(name, {}))
            if saved != here:
                raise ValueError(
                    f"the checkpoint holds {section} {saved} for {name!r}, the state dict dcp.load filled holds {here}: "
                    "dcp.load reads only what the template names, so build the optimizer as the saving run did (the "
                    "same method and base optimizer, with the same options) and take the template from "
                    "flatminima.distributed.get_optimizer_state_dict(model, opt)"
                )
    index = {name: i for i, name in enumerate(names)}

    def held(section: str) -> dict[int, dict[str, Any]]:
        values = optim_state_dict[section]
        return {index[n]: {k: values[n][k] for k in keys} for n, keys in record["held"][section].items()}

    opt.load_state_dict({
        "state": held("method"),
        "param_groups": _numbered(record["param_groups"], index),
        "base": {"state": held("state"), "param_groups": _numbered(record["base_param_groups"], index)},
        "flatminima": record["flatminima"],
    })


# ---------------------------------------------------------------------- checks and names
def _check(model: Any, opt: Any) -> SharpnessAware:
    if not isinstance(opt, SharpnessAware):
        raise TypeError(
            f"flatminima.distributed saves a flatminima optimizer, got {type(opt).__name__}; for a plain optimizer "
            "use torch.distributed.checkpoint.state_dict.get_optimizer_state_dict (one optimizer per call here)"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be the torch.nn.Module the optimizer trains, got {type(model).__name__}")
    if (opt._shards is not None and opt._shards.kind == "FSDP1") or type(model).__name__ == "FullyShardedDataParallel":
        raise ValueError(
            f"{type(opt).__name__} under FSDP1 (FullyShardedDataParallel): its flattened shards have no parameter "
            "FQNs of their own; use FSDP2 (torch.distributed.fsdp.fully_shard), or save opt.state_dict() on every rank"
        )
    if type(opt.base_optimizer).__name__ == "ZeroRedundancyOptimizer":
        raise ValueError(
            f"{type(opt).__name__} with ZeroRedundancyOptimizer as the base: ZeRO shards the base optimizer's state "
            "its own way; call opt.base_optimizer.consolidate_state_dict(to=0) on every rank and save opt.state_dict() "
            "on rank 0 (docs/distributed.md)"
        )
    return opt


def _names(model: nn.Module, opt: SharpnessAware) -> list[str]:
    """The FQN of each of the optimizer's parameters, in its order: ``model``'s names with DDP's and
    ``torch.compile``'s wrappers taken off (``get_model_state_dict``'s names)."""
    root: nn.Module = model
    while isinstance(root, nn.parallel.DistributedDataParallel) or type(root).__name__ == "OptimizedModule":
        root = root.module if isinstance(root, nn.parallel.DistributedDataParallel) else root._orig_mod  # type: ignore[assignment]
    fqn = {id(p): name for name, p in root.named_parameters()}  # a tied parameter: its first name
    params = opt._all_params()
    absent = [i for i, p in enumerate(params) if id(p) not in fqn]
    if absent:
        raise ValueError(
            f"{len(absent)} of the optimizer's {len(params)} parameters (indices {absent[:5]}) are not parameters of "
            f"the {type(model).__name__} given: pass the model whose parameters the optimizer trains"
        )
    return [fqn[id(p)] for p in params]


def _check_base_layout(opt: SharpnessAware, base: Mapping[str, Any], n: int) -> None:
    """The base optimizer's state dict numbers the parameters as ``opt`` orders them (torch's layout)."""
    ids = [i for g in base.get("param_groups", []) for i in g.get("params", [])]
    if ids != list(range(n)) or not set(base.get("state", {})) <= set(ids):
        raise ValueError(
            f"{type(opt).__name__}: the base optimizer {type(opt.base_optimizer).__name__} has a state dict of its "
            "own layout (not torch.optim's, parameters numbered in param-group order), which distributed checkpoints "
            "cannot key by FQN; save opt.state_dict() on every rank"
        )


def _named(groups: Sequence[Mapping[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    return [{**g, "params": [names[i] for i in g["params"]]} for g in groups]


def _numbered(groups: Sequence[Mapping[str, Any]], index: Mapping[str, int]) -> list[dict[str, Any]]:
    return [{**g, "params": [index[n] for n in g["params"]]} for g in groups]


def _differ(saved: list[str], here: list[str]) -> str:
    lost, new = [n for n in saved if n not in here], [n for n in here if n not in saved]
    what = f"lacks {lost[:5]} and has {new[:5]} besides" if lost or new else "orders them otherwise"
    return (
        f"the checkpoint's optimizer holds the parameters {saved[:5]}{'...' if len(saved) > 5 else ''}; this one "
        f"{what}: build the model and the optimizer's param groups as the saving run did"
    )


def _read_record(optim_state_dict: Any) -> dict[str, Any]:
    blob = optim_state_dict.get("flatminima") if isinstance(optim_state_dict, Mapping) else None
    if not isinstance(blob, bytes) or not all(isinstance(optim_state_dict.get(s), Mapping) for s in _SECTIONS):
        raise ValueError(
            "set_optimizer_state_dict expects the state dict of flatminima.distributed.get_optimizer_state_dict "
            "(filled by torch.distributed.checkpoint.load); for opt.state_dict() use opt.load_state_dict()"
        )
    record = torch.load(io.BytesIO(blob), weights_only=True)
    if not isinstance(record, dict) or record.get("format") != _FORMAT:
        found = record.get("format") if isinstance(record, dict) else type(record).__name__
        raise ValueError(f"unsupported flatminima distributed checkpoint format {found!r} (expected {_FORMAT})")
    return record


# ---------------------------------------------------------------------- placeholders, ranks
def _base_placeholders(base: torch.optim.Optimizer, missing: list[Tensor]) -> dict[int, dict[str, Any]]:
    """The state the base optimizer would create for each of ``missing`` (by ``id``), without
    keeping it: one step at lr 0 with zero gradients on those parameters alone, then the
    parameters, gradients, learning rates and the base's state put back as they were."""
    if not missing:
        return {}
    params = [p for g in base.param_groups for p in g["params"]]
    grads = [p.grad for p in params]
    values = [p.detach().clone() for p in missing]
    lrs = [g.get("lr") for g in base.param_groups]
    try:
        with torch.no_grad():
            for p in params:
                p.grad = None  # the parameters with state are left out of the step
            for p in missing:
                p.grad = torch.zeros_like(p)
            for g, lr in zip(base.param_groups, lrs):
                if lr is not None:
                    g["lr"] = torch.zeros_like(lr) if isinstance(lr, Tensor) else 0.0
            base.step()
        return {id(p): dict(base.state.get(p, {})) for p in missing}
    finally:
        with torch.no_grad():
            for p in missing:
                base.state.pop(p, None)
            for p, value in zip(missing, values):
                p.copy_(value)
            for p, grad in zip(params, grads):
                p.grad = grad
            for g, lr in zip(base.param_groups, lrs):
                if lr is not None:
                    g["lr"] = lr


def _check_replicated(opt: SharpnessAware, model: nn.Module, blob: bytes, state: Mapping[str, Any], method: Mapping[str, Any]) -> None:
    """DCP keeps one copy of what is not a DTensor; refuse to save when the ranks hold different copies
    (ESAM's seed= per rank under DDP; state of a rank's own making). One collective."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    digests = {
        "the counters, method-level state and param groups": _digest([blob]),
        "the base optimizer's state": _digest(_plain(state)),
        "the method's per-parameter state": _digest(_plain(method)),
    }
    ddp = _replicas.ddp_module(model) or _replicas.ddp_module(opt.model)
    group = opt._shards.group if opt._shards is not None else ddp.process_group if ddp is not None else None
    device = opt._all_params()[0].device if opt._all_params() else torch.device("cpu")
    differ = [what for what, d in zip(digests, _sharding.differ_between_ranks(group, device, list(digests.values()))) if d]
    if differ:
        raise ValueError(
            f"{type(opt).__name__}: {' and '.join(differ)} differ between the ranks, and a distributed checkpoint keeps "
            "one copy of what is not sharded, so a resumed run would change: pass the same value on every rank where "
            "an option made them differ (ESAM's seed=), or save opt.state_dict() on every rank"
        )


def _plain(section: Mapping[str, Mapping[str, Any]]) -> list[Any]:
    """The values of a section that are not DTensors (those DCP saves once for every rank), in key order."""
    out: list[Any] = []
    for name in sorted(section):
        for key in sorted(section[name]):
            value = section[name][key]
            if not _sharding._is_dtensor(value):
                out.append(value)
    return out


def _digest(values: list[Any]) -> int:
    """A 64-bit digest of tensors' bytes (and of other values' reprs)."""
    h = hashlib.blake2b(digest_size=8)
    for v in values:
        if isinstance(v, Tensor):
            t = v.detach().cpu().contiguous()
            h.update(str((t.dtype, tuple(t.shape))).encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(v if isinstance(v, bytes) else repr(v).encode())
    return int.from_bytes(h.digest(), "little")
