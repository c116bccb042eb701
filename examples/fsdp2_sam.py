"""SAM under FSDP2 (``fully_shard``), launched with torchrun (CPU, gloo):

    torchrun --standalone --nproc-per-node 2 examples/fsdp2_sam.py --steps 20
    torchrun --standalone --nproc-per-node 2 examples/fsdp2_sam.py --steps 20 --checkpoint /tmp/ckpt

Each rank holds a shard of every parameter (DTensors); the optimizer is built
over the sharded parameters, after ``fully_shard``, with no ``model=`` needed
(give it anyway to keep BatchNorm's running statistics from the clean pass).
The step is one global eps from the averaged clean gradient: every norm is
reduced over the whole model, so the run is the method's full-batch step. At
the end the ranks gather the weights and rank 0 compares them with the same
method run in one process on the global batch.

With ``--checkpoint DIR`` the run is also saved halfway with
``torch.distributed.checkpoint`` (flatminima.distributed), and a fresh model
and optimizer resumed from DIR take the remaining steps: their weights equal
the uninterrupted run's, bit for bit.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    set_model_state_dict,
)
from torch.distributed.fsdp import fully_shard

import flatminima
from flatminima.distributed import get_optimizer_state_dict, set_optimizer_state_dict


def build(seed: int | None = 0) -> nn.Sequential:
    if seed is not None:
        torch.manual_seed(seed)  # the same initial weights on every rank
    return nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 4))


def sharded(seed: int | None = 0) -> nn.Sequential:
    model = build(seed)
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)  # one all-gather per layer in the forward
    fully_shard(model)  # the root: every parameter a DTensor sharded over the ranks
    return model


def batches(steps: int, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    data = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 4, generator=data)
    xs = [torch.randn(size, 20, generator=data) for _ in range(steps)]
    return [(x, (x @ teacher).argmax(1)) for x in xs]


def train(model: nn.Module, method: str, data: list[tuple[torch.Tensor, torch.Tensor]], log: bool,
          save: tuple[int, str] | None = None, resume: tuple[int, str] | None = None) -> None:
    """``data``'s steps; ``save``: (step, dir) a checkpoint before that step; ``resume``: from that one."""
    opt = flatminima.create(method, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    start = 0
    if resume:
        start, path = resume
        sd = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=path)
        set_model_state_dict(model, sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])
    for step, (x, y) in enumerate(data[start:], start):
        if save and step == save[0]:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=save[1])

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if log and step % 10 == 0:
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--method", default="sam", choices=[m for m in flatminima.list_methods() if m != "esam"])
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--checkpoint", default=None, help="save halfway into this directory, resume a fresh run from it")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    model = sharded()
    data = batches(args.steps, world * args.batch)  # the global batches; each rank takes its shard
    mine = [(x.chunk(world)[rank], y.chunk(world)[rank]) for x, y in data]
    half = (args.steps // 2, args.checkpoint) if args.checkpoint else None
    train(model, args.method, mine, log=rank == 0, save=half)
    if half:
        torch.manual_seed(rank + 1)  # other weights: every value must come from the checkpoint
        resumed = sharded(seed=None)
        train(resumed, args.method, mine, log=False, resume=half)
        same = all(torch.equal(a.to_local(), b.to_local()) for a, b in zip(model.parameters(), resumed.parameters()))
        flags = torch.tensor([float(same)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        if rank == 0:
            print(f"resumed from {args.checkpoint} at step {half[0]}: bit-identical to the uninterrupted run: "
                  f"{bool(flags.item())}", flush=True)

    weights = [p.full_tensor().detach() for p in model.parameters()]  # a collective: every rank calls it
    if rank == 0:
        single = build()
        train(single, args.method, data, log=False)
        diff = max(float((a - b).abs().max()) for a, b in zip(weights, [p.detach() for p in single.parameters()]))
        print(f"max |w_fsdp2 - w_full_batch| = {diff:.3e}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
