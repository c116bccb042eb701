"""Gradient accumulation: a closure that loops over micro-batches (each
loss divided by their number) gives the full-batch step, for every
configuration of methods_db whose closure has PyTorch's form (no BatchNorm:
its batch statistics would differ per micro-batch). docs/training.md shows
the loop.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import helpers
from methods_db import CASES, Case, build_schedulers
from test_reference import build_pair

MICRO = 4


def accumulating_closure(opt, model: nn.Module, x: torch.Tensor, y: torch.Tensor, micro: int):  # type: ignore[no-untyped-def]
    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), dtype=x.dtype)
        for xb, yb in zip(x.chunk(micro), y.chunk(micro)):
            loss = nn.functional.cross_entropy(model(xb), yb) / micro
            loss.backward()
            total += loss.detach()
        return total

    return closure


@pytest.mark.parametrize("case", [c for c in CASES if c.closure == "loss"], ids=lambda c: c.id)
def test_micro_batches_give_the_full_batch_step(case: Case) -> None:
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = build_schedulers(case, opt, opt2)
    w0 = helpers.params_of(model)
    for i, (x, y) in enumerate(helpers.batches(4, torch.float64)):
        torch.manual_seed(i)
        loss = opt.step(accumulating_closure(opt, model, x, y, MICRO))
        torch.manual_seed(i)
        full = opt2.step(helpers.make_closure(opt2, model2, x, y))
        for s in schedulers:
            s.step()
        assert abs(float(loss) - float(full.detach())) < 1e-12
    diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(model2))
    assert diff <= 1e-12, f"{case.id}: micro-batches vs full batch: {diff:.3e}"
    assert helpers.max_abs_diff(helpers.params_of(model), w0) > 1e-4
    assert opt.perturbed_steps == opt2.perturbed_steps > 0
