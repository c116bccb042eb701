"""State dicts saved by the version before the house redesign (commit
2fbb234; tests/data/make_legacy_state_dicts.py wrote them) load into
today's optimizers, and the resumed run takes the steps that version took,
bit for bit. The file is read with ``weights_only=True``."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

import flatminima
import helpers

LEGACY = torch.load(Path(__file__).parent / "data" / "legacy_state_dicts.pt", weights_only=True)


def test_every_method_of_that_version_is_covered() -> None:
    assert set(LEGACY) == set(flatminima.list_methods()) - {"momentum_sam"}  # momentum_sam is newer


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_old_state_dict_resumes_bit_for_bit(name: str) -> None:
    saved: dict[str, Any] = copy.deepcopy(LEGACY[name])  # loading shares tensors that steps then change
    model = helpers.mlp(torch.float64, seed=1)  # other weights: all of them come from the file
    model.load_state_dict(saved["model"])
    opt = flatminima.create(name, helpers.two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9, **saved["kwargs"])
    opt.load_state_dict(saved["optimizer"])
    assert opt.step_count == 3
    for x, y in helpers.batches(6, torch.float64)[3:]:
        opt.step(helpers.make_closure(opt, model, x, y))
    for p, want in zip(model.parameters(), saved["after"]):
        assert torch.equal(p.detach(), want), name


@pytest.mark.parametrize("name", sorted(LEGACY))
def test_same_steps_as_that_version(name: str) -> None:
    """From the same start, today's optimizer takes that version's first three
    steps bit for bit (the weights it saved)."""
    saved: dict[str, Any] = copy.deepcopy(LEGACY[name])  # loading shares tensors that steps then change
    model = helpers.mlp(torch.float64, seed=0)
    opt = flatminima.create(name, helpers.two_groups(model), torch.optim.SGD, lr=0.1, momentum=0.9, **saved["kwargs"])
    for x, y in helpers.batches(6, torch.float64)[:3]:
        opt.step(helpers.make_closure(opt, model, x, y))
    for key, value in model.state_dict().items():
        assert torch.equal(value, saved["model"][key]), f"{name}: {key}"
    helpers.assert_tree_equal(opt.state_dict(), saved["optimizer"])
