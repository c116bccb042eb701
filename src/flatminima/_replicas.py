"""What the ranks of a data-parallel run must agree on: one object.

Under DDP (``model=`` the ``DistributedDataParallel`` module, or a
LightningModule that Lightning's DDP strategy wrapped in one) the default
is one ``eps`` per replica: the clean pass runs under ``no_sync()`` and only
the perturbed gradient is averaged, by DDP itself. What a method computes
from its own replica's gradient (a kept clean gradient, an EMA) is
averaged here, as are the gradients of steps without a perturbed pass, and
every skip decision is taken on all ranks together (or their collectives
fall out of step). With ``sync_perturbations=True`` DDP averages both
passes and nothing here runs. Sharded parameters (FSDP) have one global
eps, and their reductions live in ``_sharding``; nothing else in the package
calls a collective.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from . import _tensorops as T
from ._context import StepContext
from ._sharding import Shards, refuse_per_replica

_BUCKET_ELEMENTS = 1 << 24  # 64 MiB of float32: bounds the flat buffer's memory


def ddp_module(model: nn.Module | None) -> nn.parallel.DistributedDataParallel | None:
    """The ``DistributedDataParallel`` wrapper that runs ``model``: ``model``
    itself when it is one, or the one a Lightning Trainer put around it, else
    None. Looked up at every step: Lightning's ``strategy="ddp"`` wraps the
    LightningModule at ``fit()``, and the user only knows ``model=self``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model
    wrapper = _trainer_model(model)
    if isinstance(wrapper, nn.parallel.DistributedDataParallel) and wrapper.module is model:
        return wrapper
    return None


def _trainer_model(model: nn.Module | None) -> object:
    """``model.trainer.model``: what a Lightning Trainer runs a LightningModule
    through (the DDP wrapper under ``strategy="ddp"``), read by duck typing so
    that the core imports no Lightning; None when there is none."""
    try:
        trainer = getattr(model, "trainer", None)
    except RuntimeError:  # LightningModule.trainer raises when no Trainer is attached
        return None
    return getattr(trainer, "model", None)


def world_size(group: object) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)  # type: ignore[arg-type]


def on_any_rank(flags: list[bool], group: object, device: torch.device) -> list[bool]:
    """Each flag OR-ed over the ranks (one collective of ``len(flags)`` bytes)."""
    import torch.distributed as dist

    t = torch.tensor(flags, dtype=torch.uint8, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    return [bool(x) for x in t.tolist()]


def all_reduce_mean_(tensors: list[Tensor], group: object, device: torch.device) -> None:
    """Average ``tensors`` across the ranks in place, through flat buffers of
    at most ``_BUCKET_ELEMENTS`` per device and dtype. Every rank must call
    it with the same shapes in the same order: one small collective checks
    that first, and every rank raises the same ValueError when they differ
    (mismatched buffers would hang or mix values)."""
    import torch.distributed as dist
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    count, numel = float(len(tensors)), float(sum(t.numel() for t in tensors))
    sig = torch.tensor([count, numel, -count, -numel], dtype=torch.float64, device=device)
    dist.all_reduce(sig, op=dist.ReduceOp.MAX, group=group)  # type: ignore[arg-type]
    if sig[0] != -sig[2] or sig[1] != -sig[3]:
        raise ValueError(
            "the replicas' gradients cover different parameters (unused parameters on some ranks), so "
            "their per-replica values cannot be averaged; make every rank give every trained parameter a "
            "gradient, or pass sync_perturbations=True (DDP then averages both passes itself)"
        )
    n = world_size(group)
    buckets: dict[tuple[torch.device, torch.dtype], list[list[Tensor]]] = {}
    for t in tensors:
        lists = buckets.setdefault((t.device, t.dtype), [[]])
        if lists[-1] and sum(x.numel() for x in lists[-1]) + t.numel() > _BUCKET_ELEMENTS:
            lists.append([])
        lists[-1].append(t)
    for lists in buckets.values():
        for bucket in lists:
            flat = _flatten_dense_tensors(bucket)
            dist.all_reduce(flat, group=group)  # type: ignore[arg-type]
            flat.div_(n)
            for t, avg in zip(bucket, _unflatten_dense_tensors(flat, bucket)):
                t.copy_(avg)


def step_device(ctx: StepContext) -> torch.device:
    """Where the step's collectives run: the device of its parameters."""
    for view in ctx.groups:
        for p in view.group["params"]:
            return p.device
    return torch.device("cpu")


class Replicas:
    """The data-parallel side of a step, for ``model`` (any module; only a
    DDP wrapper makes it do anything) and parameters sharded as ``shards``
    (FSDP: one global eps, no per-replica one; ``_sharding``)."""

    def __init__(self, model: nn.Module | None, sync_perturbations: bool, shards: Shards | None = None) -> None:
        self.ddp = ddp_module(model)
        self.sync = sync_perturbations
        self.shards = shards

    def per_replica_group(self) -> Any:
        """The process group when ``eps`` is per replica, else None."""
        if self.ddp is None or self.sync:
            return None
        return self.ddp.process_group if world_size(self.ddp.process_group) > 1 else None

    def chunk_group(self, own_eps: bool = True) -> Any:
        """The process group of a chunked step (every pass local), else None;
        ``own_eps``: each chunk has an eps of its own (not with a pre-pass eps)."""
        refuse_per_replica(self.shards, "chunks=")
        if self.ddp is not None and self.sync and own_eps:
            raise ValueError(
                "chunks= gives every chunk its own eps, sync_perturbations=True one eps for all replicas: "
                "use one or the other"
            )
        return self.ddp.process_group if self.ddp is not None and world_size(self.ddp.process_group) > 1 else None

    def local_pass(self) -> ContextManager[Any]:
        """``no_sync()`` when the clean gradient must stay on its replica."""
        return nullcontext() if self.ddp is None or self.sync else self.ddp.no_sync()

    def chunk_pass(self) -> Callable[[], ContextManager[Any]]:
        return self.ddp.no_sync if self.ddp is not None else nullcontext

    @staticmethod
    def agree(finite: bool, ctx: StepContext, device: torch.device) -> bool:
        """Whether ``finite`` holds on every rank of the step's group."""
        if ctx.group is None:
            return finite
        return not on_any_rank([not finite], ctx.group, device)[0]

    def decide(self, ctx: StepContext, decide: Callable[[], bool], from_gradient: bool) -> bool:
        """``decide()`` with per-replica gradients made consistent: a step
        without a perturbed pass descends along the replicas' mean gradient,
        and a method that decides from the gradient decides from that mean
        (then perturbs from its own replica's gradient)."""
        if ctx.group is None or ctx.chunked:
            return decide()
        if not from_gradient:
            if decide():
                return True
            self.average_grads(ctx)
            return False
        fe = ctx.foreach
        local = {p: g for v in ctx.groups for p, g in zip(v.params, T.clone(v.grads, fe))}
        self.average_grads(ctx)  # may add zero gradients (parameters unused on this rank)
        if not decide():
            return False
        for v in ctx.groups:
            own = [(g, local[p]) for p, g in zip(v.params, v.grads) if p in local]
            T.copy_([g for g, _ in own], [c for _, c in own], fe)
            T.zero_([g for p, g in zip(v.params, v.grads) if p not in local], fe)  # no local gradient: eps 0
        ctx.grad_sq = [T.sum_of_squares(v.grads, fe) for v in ctx.groups]
        return True

    @staticmethod
    def average_grads(ctx: StepContext) -> None:
        """Average the replicas' clean gradients as DDP would have: a
        parameter with a gradient on some ranks only counts zero on the
        others (one small collective agrees on which have one)."""
        params = [p for v in ctx.groups for p in v.group["params"]]
        device = step_device(ctx)
        anywhere = on_any_rank([p.grad is not None for p in params], ctx.group, device)
        missing = [p for p, there in zip(params, anywhere) if there and p.grad is None]
        for p in missing:
            p.grad = torch.zeros_like(p, memory_format=torch.preserve_format)
        if missing:
            for v in ctx.groups:
                v.params = [p for p in v.group["params"] if p.grad is not None]
                v.grads = [g for p in v.params if (g := p.grad) is not None]
        all_reduce_mean_([g for v in ctx.groups for g in v.grads], ctx.group, device)
        ctx.grad_sq = [T.sum_of_squares(v.grads, ctx.foreach) for v in ctx.groups]

    @staticmethod
    def average_shards(ctx: StepContext, grads: bool, keeps_clean: bool, shard_state: tuple[str, ...]) -> None:
        """Average over the ranks what each computed from its own gradient:
        the kept clean gradients, the method's ``shard_state`` and, with
        ``grads``, ``.grad`` itself (chunks: every pass was local)."""
        tensors = [g for v in ctx.groups for g in v.grads] if grads else []
        tensors += [c for v in ctx.groups for c in (v.clean or [])]
        for key in shard_state:
            tensors += [t for t in ctx.extra.get(key, {}).values() if t is not None]
        # Whether to call depends on the class and ``grads`` alone, so that
        # every rank joins (a rank whose list happens to be empty too).
        if grads or keeps_clean or shard_state:
            all_reduce_mean_(tensors, ctx.group, step_device(ctx))
        shard_norms(ctx, grads)


def shard_norms(ctx: StepContext, grads: bool = True) -> None:
    """Norms of averaged gradients: of ``.grad`` when it was averaged
    (``grads``), and ``grad_sq`` from the kept clean copy after a perturbed
    pass (without one it stays the shards' own, which nothing reads after a
    perturbed pass)."""
    fe = ctx.foreach
    if ctx.perturbed:
        if grads:
            ctx.perturbed_sq = [T.sum_of_squares(v.grads, fe) for v in ctx.groups]
        if all(v.clean is not None for v in ctx.groups):
            ctx.grad_sq = [T.sum_of_squares(v.clean, fe) for v in ctx.groups]  # type: ignore[arg-type]
    elif grads:
        ctx.grad_sq = [T.sum_of_squares(v.grads, fe) for v in ctx.groups]
