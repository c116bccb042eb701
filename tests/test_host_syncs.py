"""Host reads of device values in one ``step()`` (each one a synchronisation on CUDA), counted on
CPU with :func:`benchmarks.syncs.count_host_reads` (issue #15 item 4).

On the CPU, SAM, ASAM, WSAM and GSAM read the device twice per step: the finite check of the
clean gradient (it decides whether the perturbed pass runs) and that of the perturbed one (it
decides whether the base optimizer may step). On an accelerator, with ``model=`` given, the two are
one read (``flatminima._deferred``; tests/test_deferred_check.py turns it on here). On CPU the
radius factor is also read, to fold it into one add (``_views.step_out``); on a device it stays a
tensor. A new read in the hot path fails here.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import flatminima  # noqa: E402
from benchmarks.syncs import count_host_reads  # noqa: E402


def _sam_step(name: str, poison: bool = False) -> tuple[flatminima.SharpnessAware, object]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))
    opt = flatminima.create(name, model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9)

    warm = [True]

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (loss * float("nan") if poison and not warm[0] else loss).backward()
        return loss

    opt.step(closure)  # warm-up: the base optimizer's state exists
    warm[0] = False
    return opt, closure


def _by_function(where: dict[str, int]) -> dict[str, int]:
    return {re.sub(r":\d+", "", k): v for k, v in where.items()}


@pytest.mark.parametrize("name", ["sam", "asam", "wsam", "gsam"])
def test_sam_like_step_reads_the_device_at_its_two_decisions(name: str) -> None:
    opt, closure = _sam_step(name)
    per_step, where = count_host_reads(lambda: opt.step(closure), calls=3)
    assert _by_function(where) == {"_tensorops.py is_finite": 6, "_views.py step_out": 3}, where
    assert per_step == 3.0 and opt.skipped_steps == 0


def test_a_skipped_step_reads_only_for_its_finite_check() -> None:
    """A non-finite clean gradient: no perturbed pass, and a second read only to tell a float32
    sum of squares that overflowed (taken again in float64) from a real inf or NaN."""
    opt, closure = _sam_step("sam", poison=True)
    with pytest.warns(RuntimeWarning, match="non-finite gradient in the clean pass"):
        per_step, where = count_host_reads(lambda: opt.step(closure))
    assert _by_function(where) == {"_tensorops.py is_finite": 2} and opt.skipped_steps == 1


def test_the_counter_sees_every_kind_of_read() -> None:
    t = torch.tensor([1.5])
    n, where = count_host_reads(lambda: (t.item(), bool(t), float(t), t.tolist()))
    assert n == 4 and list(where) == [next(iter(where))] and "test_host_syncs.py" in next(iter(where))
