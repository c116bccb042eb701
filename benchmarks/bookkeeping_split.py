"""SAM's bookkeeping split into a fixed per-step cost and a per-byte cost, against pytorch_optimizer's:
``python -m benchmarks.bookkeeping_split``.

``first_step()`` + ``second_step()`` with the gradients already in ``.grad`` and a base optimizer whose
step does nothing, on 6 one-element tensors (what a step costs whatever the model: Python and kernel
launches) and on the 6 tensors of the issue's MLP (78,858 parameters); median of 2000 calls, one thread.
"""

from __future__ import annotations

import statistics
import time

import torch

from ._env import flatminima  # noqa: F401  (falls back to src/ when not installed)
import flatminima


class NoOp(torch.optim.SGD):
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        return None


def main() -> None:
    import pytorch_optimizer as po

    torch.set_num_threads(1)
    torch.manual_seed(0)
    for label, sizes in (("6 one-element tensors", [1] * 6), ("the 79k MLP's 6 tensors", [10240, 256, 65536, 256, 2560, 10])):
        params = [torch.nn.Parameter(torch.randn(s)) for s in sizes]
        g0 = [torch.randn_like(p) for p in params]
        gp = [g * 1.01 for g in g0]
        opts = {"flatminima SAM": flatminima.SAM(params, NoOp, lr=0.1), "pytorch_optimizer SAM": po.SAM(params, NoOp, lr=0.1)}

        def run(o: torch.optim.Optimizer) -> float:
            for p, g in zip(params, g0):
                p.grad = g.clone()
            t0 = time.perf_counter()
            o.first_step()  # type: ignore[attr-defined]
            for p, g in zip(params, gp):
                p.grad = g
            o.second_step()  # type: ignore[attr-defined]
            return time.perf_counter() - t0

        for name, o in opts.items():
            for _ in range(50):
                run(o)
            us = statistics.median(run(o) for _ in range(2000)) * 1e6
            print(f"{label:26s} {name:22s} {us:7.0f} us")


if __name__ == "__main__":
    main()
