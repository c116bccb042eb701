"""SAM under DDP, launched with torchrun (CPU, gloo):

    torchrun --standalone --nproc-per-node 2 examples/ddp_sam.py --steps 50

Give the optimizer the DDP module as ``model=``: ``step(closure)`` then runs
the clean pass under ``no_sync()`` (each replica perturbs with its own
gradient: the paper's m-sharpness, with m the per-replica batch) and lets
DDP average only the perturbed pass's gradient. ``sync_perturbations=True``
averages the clean gradient too (one global eps). Every rank prints a
checksum of its weights at the end: they are the same.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn

import flatminima


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--method", default="sam", choices=flatminima.list_methods())
    parser.add_argument("--batch", type=int, default=64, help="per-replica batch (the m of m-sharpness)")
    parser.add_argument("--sync-perturbations", action="store_true", help="one global eps instead of one per replica")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR/PORT
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))

    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = nn.Sequential(nn.Linear(20, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 4))
    ddp = nn.parallel.DistributedDataParallel(model)
    opt = flatminima.create(
        args.method, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9,
        model=ddp, sync_perturbations=args.sync_perturbations,
    )

    data = torch.Generator().manual_seed(1)
    teacher = torch.randn(20, 4, generator=data)
    for step in range(args.steps):
        x = torch.randn(world * args.batch, 20, generator=data)  # the global batch; each rank takes its shard
        y = (x @ teacher).argmax(1)
        xr, yr = x.chunk(world)[rank], y.chunk(world)[rank]

        def closure() -> torch.Tensor:
            opt.zero_grad()
            loss = nn.functional.cross_entropy(ddp(xr), yr)
            loss.backward()
            return loss

        loss = opt.step(closure)
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}", flush=True)

    # Weights only: BatchNorm's running statistics are each rank's own until
    # DDP broadcasts rank 0's at the next forward (broadcast_buffers=True).
    checksum = sum(float(p.detach().double().sum()) for p in model.parameters())
    print(f"checksum rank {rank} {checksum!r}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
