"""Parameters sharded over ranks (FSDP1, FSDP2): every global quantity over the whole model.

Under FSDP a rank holds a shard of every parameter (FSDP2: ``DTensor``
parameters sharded on dim 0; FSDP1: ``FlatParameter`` shards, or with
``use_orig_params=True`` flattened views of them), and the gradient FSDP
leaves in ``.grad`` is the shard of the ranks' *averaged* gradient. A rank
cannot perturb the other ranks' shards, so there is no per-replica ``eps``:
the step is one global ``eps`` from the averaged clean gradient, each
method's full-batch step. What a formula takes over "all parameters" (a
norm, an inner product) is the sum of the shards' local values, all-reduced
once per quantity (the values of a quantity's groups or tensors travel in
one collective). Elementwise maps need nothing: each rank maps its shard.

What needs whole tensors (GCSAM's mean per output channel, ESAM's mask per
tensor, LookSAM's per-tensor cosines) is exact under FSDP2, whose shards
are whole rows of whole tensors, and refused under FSDP1, whose shards are
slices of a flattened concatenation (``Part.needs_whole_tensors``).

Plain tensors and DDP replicas have no shards: ``detect`` returns None and
every function here is the plain reduction (no collective, the same bits).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from . import _tensorops as T
from ._context import StepContext, total

_FSDP2_HINT = "FSDP2 (torch.distributed.fsdp.fully_shard) shards whole rows and supports it"


@dataclass(frozen=True)
class Shards:
    """How the parameters are sharded: ``kind`` ("FSDP1" or "FSDP2"), the
    process group the shards are spread over, the device its collectives use."""

    kind: str
    group: Any
    device: torch.device

    def local(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The rank's own part of each tensor (a DTensor's local shard; an FSDP1 shard is one already)."""
        return [t.to_local() if _is_dtensor(t) else t for t in tensors]  # type: ignore[attr-defined]

    def sum(self, values: Sequence[Tensor]) -> list[Tensor]:
        """Each rank's partial values summed over the ranks, in one collective."""
        import torch.distributed as dist

        if not values:
            return []
        acc = torch.float64 if any(v.dtype == torch.float64 for v in values) else torch.float32
        flat = torch.stack([v.detach().to(device=self.device, dtype=acc) for v in values])
        dist.all_reduce(flat, group=self.group)
        return [x.to(v.dtype) for x, v in zip(flat.unbind(), values)]


def _is_dtensor(t: Any) -> bool:
    return type(t).__name__ == "DTensor" and hasattr(t, "device_mesh")


def _fsdp1_module(model: nn.Module | None) -> Any:
    """``model`` when it is a ``FullyShardedDataParallel`` module, else None (no import when FSDP1 is absent)."""
    if model is None or type(model).__name__ != "FullyShardedDataParallel":
        return None
    from torch.distributed.fsdp import FullyShardedDataParallel

    return model if isinstance(model, FullyShardedDataParallel) else None


def detect(model: nn.Module | None, params: Iterable[Tensor]) -> Shards | None:
    """The sharding of ``params`` (the optimizer's), or None for plain tensors and DDP replicas.
    FSDP2 is read from the parameters (DTensors), FSDP1 from ``model=`` (the
    FullyShardedDataParallel module, whose process group the norms are reduced
    over); an FSDP1 shard without it, or a layout whose shards cannot be summed
    into the whole, is refused."""
    params = list(params)
    dtensors = [p for p in params if _is_dtensor(p)]
    if dtensors:
        return _fsdp2(dtensors, len(params))
    fsdp = _fsdp1_module(model)
    flattened = any(getattr(p, "_fsdp_flattened", False) for p in params)
    if fsdp is None:
        if flattened:
            raise ValueError(
                "these parameters are FSDP1 shards (FullyShardedDataParallel flattens them), but model= is not "
                "the FullyShardedDataParallel module: pass model=<the FSDP module> so that norms are reduced over "
                "its process group (a per-shard norm would be wrong), or use " + _FSDP2_HINT
            )
        return None
    from torch.distributed.fsdp import ShardingStrategy

    strategy = fsdp.sharding_strategy
    if strategy == ShardingStrategy.NO_SHARD:
        return None  # whole parameters, averaged gradients: every rank computes the global step alone
    if strategy not in (ShardingStrategy.FULL_SHARD, ShardingStrategy.SHARD_GRAD_OP):
        raise ValueError(
            f"FSDP1 with sharding_strategy={strategy.name} is not supported (its shards are reduced over two "
            "process groups): use FULL_SHARD or SHARD_GRAD_OP, or FSDP2 with a 2-D mesh (HSDP)"
        )
    device = next((p.device for p in params), torch.device("cpu"))
    return Shards("FSDP1", fsdp.process_group, device)


def _fsdp2(dtensors: list[Any], n_params: int) -> Shards:
    if len(dtensors) != n_params:
        raise ValueError(
            f"{len(dtensors)} of the {n_params} parameters are DTensors (FSDP2) and the others plain tensors: "
            "apply fully_shard to the root module too, so that every parameter is sharded"
        )
    mesh, placements = dtensors[0].device_mesh, tuple(dtensors[0].placements)
    shard_dims = [i for i, pl in enumerate(placements) if pl.is_shard()]
    if len(shard_dims) != 1 or not all(pl.is_shard() or pl.is_replicate() for pl in placements):
        raise ValueError(
            f"DTensor parameters with placements {placements} are not supported: one Shard dimension "
            "(FSDP2's fully_shard, or HSDP's (Replicate(), Shard(0))) is"
        )
    for p in dtensors:
        if p.device_mesh != mesh or tuple(p.placements) != placements:
            raise ValueError(
                f"DTensor parameters on different meshes or placements ({p.device_mesh}, {tuple(p.placements)} "
                f"and {mesh}, {placements}): shard every parameter of the optimizer with the same mesh"
            )
    group = mesh.get_group(shard_dims[0]) if mesh.ndim > 1 else mesh.get_group()
    return Shards("FSDP2", group, dtensors[0].device)


def check_group(opt: Any, group: Mapping[str, Any]) -> None:
    """Refuse, under FSDP1, a part of ``opt`` that needs whole tensors in ``group``."""
    shards: Shards | None = getattr(opt, "_shards", None)
    if shards is None or shards.kind != "FSDP1":
        return
    for part in type(opt).parts():
        reason = part.needs_whole_tensors(opt, group)
        if reason:
            raise ValueError(
                f"{type(opt).__name__} cannot run under FSDP1: {reason}, and FSDP1 shards slices of a flattened "
                f"concatenation of the tensors; {_FSDP2_HINT}"
            )


def refuse_per_replica(shards: Shards | None, what: str) -> None:
    """A request for per-replica (or per-chunk) ``eps`` under FSDP: refused, with the reason."""
    if shards is not None:
        raise ValueError(
            f"{what} gives every replica (chunk) its own eps, but under {shards.kind} a rank holds a shard of the "
            "parameters and cannot perturb the others' shards: the step is one global eps from the averaged "
            "clean gradient; drop it, or use DDP (docs/distributed.md)"
        )


def refuse_scaler(shards: Shards | None) -> None:
    """A GradScaler under FSDP: its inf checks and unscaling of sharded gradients are untested
    here, so the step refuses it before anything moves instead of risking a silent wrong step."""
    if shards is not None:
        raise ValueError(
            f"a GradScaler under {shards.kind} is not supported: use bf16 autocast (no scaler needed), "
            "or fp16 with a GradScaler under DDP (docs/distributed.md)"
        )


def same_on_every_rank(shards: Shards | None, value: int, name: str = "ESAM's seed") -> None:
    """Refuse a per-rank ``value`` (ESAM's mask seed) under FSDP: each rank would mask its shards
    with another draw. One collective, at construction."""
    if shards is not None and differ_between_ranks(shards.group, shards.device, [value])[0]:
        raise ValueError(
            f"{name} differs between the ranks ({value} here), so each would perturb its shards with another "
            "mask: pass the same seed= on every rank"
        )


def differ_between_ranks(group: Any, device: torch.device, values: Sequence[int]) -> list[bool]:
    """Per value (an int of up to 64 bits: a seed, a digest), whether the ranks of ``group`` hold
    different ones. One collective: the maximum of the values and of their negations."""
    import torch.distributed as dist

    parts = [float(x) for v in values for x in (v >> 32, v & 0xFFFFFFFF)]  # exact in float64
    t = torch.tensor(parts + [-x for x in parts], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    high, low = t[: len(parts)].view(-1, 2), -t[len(parts) :].view(-1, 2)
    return [not bool(same) for same in (high == low).all(dim=1).tolist()]


# ---------------------------------------------------------------------- global reductions
def squares(ctx: StepContext, items: Sequence[Sequence[Tensor] | Tensor], acc: torch.dtype | None = None) -> list[Tensor]:
    """Per item, the squared l2 norm over the whole model: an item is the
    tensors of one group (reduced here) or a value already global (kept)."""
    fe, shards = ctx.foreach, ctx.shards
    if shards is None:
        return [x if isinstance(x, Tensor) else T.sum_of_squares(x, fe, acc) for x in items]
    todo = [i for i, x in enumerate(items) if not isinstance(x, Tensor)]
    summed = shards.sum([T.sum_of_squares(shards.local(items[i]), fe, acc) for i in todo])  # type: ignore[arg-type]
    out = list(items)
    for i, value in zip(todo, summed):
        out[i] = value
    return out  # type: ignore[return-value]


def inner(ctx: StepContext, a: Sequence[Sequence[Tensor]], b: Sequence[Sequence[Tensor]]) -> Tensor:
    """``<a, b>`` over every group and the whole model."""
    fe, shards = ctx.foreach, ctx.shards
    if shards is None:
        return total([T.dot(x, y, fe) for x, y in zip(a, b)])
    return total(shards.sum([T.dot(shards.local(x), shards.local(y), fe) for x, y in zip(a, b)]))


def dots(ctx: StepContext, pairs: Sequence[tuple[Sequence[Tensor], Sequence[Tensor]]]) -> list[list[Tensor]]:
    """Per pair ``(a, b)`` of tensor lists, the per-tensor inner products ``<a_i, b_i>`` of whole
    tensors (every pair's in one collective)."""
    fe, shards = ctx.foreach, ctx.shards
    if shards is None:
        return [T.dots(a, b, fe) for a, b in pairs]
    local = [T.dots(shards.local(a), shards.local(b), fe) for a, b in pairs]
    flat = shards.sum([x for values in local for x in values])
    out, i = [], 0
    for values in local:
        out.append(flat[i : i + len(values)])
        i += len(values)
    return out
