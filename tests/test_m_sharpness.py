"""m-sharpness on one device: ``step(closure, chunks=n)`` gives every chunk of
the batch its own eps and descends along the mean over chunks (docs/algorithms.md
§1). Every configuration of methods_db against the references'
``sharded_step``, in float64; ``chunks=1`` is the plain step bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import helpers
from methods_db import CASES, Case, build_schedulers
from test_reference import build_pair

STEPS = 4
TOL = 1e-10


@pytest.mark.parametrize("chunks", [2, 4])
@pytest.mark.parametrize("base", ["sgd-momentum", "adam"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunks_match_sharded_reference(case: Case, base: str, chunks: int) -> None:
    model, opt, ref_model, ref = build_pair(case, base, case.second_group)
    schedulers = build_schedulers(case, opt, ref.base)
    for i, (x, y) in enumerate(helpers.batches(STEPS, torch.float64)):
        torch.manual_seed(1000 + i)
        loss = opt.step(helpers.chunk_closure(opt, model, x, y, chunks, case.closure), chunks=chunks)
        torch.manual_seed(1000 + i)
        ref_loss = ref.sharded_step(helpers.shard_closures(ref.base, ref_model, x, y, chunks, case.closure))
        for scheduler in schedulers:
            scheduler.step()
        diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(ref_model))
        assert diff <= TOL, f"{case.id}/{base}/chunks={chunks}: step {i + 1}: max |w - w_ref| = {diff:.3e}"
        assert abs(float(loss) - float(ref_loss)) <= TOL, f"{case.id}: step {i + 1}: mean clean loss"
    assert opt.step_count == STEPS


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_chunks_differ_from_full_batch(case: Case) -> None:
    """The chunks must each get their own eps: with two chunks the step is
    not the full-batch step (so the test above could not pass by ignoring
    ``chunks``) whenever the method perturbs."""
    model, opt, _, _ = build_pair(case, "sgd", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd", case.second_group)
    x, y = helpers.batches(1, torch.float64)[0]
    torch.manual_seed(0)
    opt.step(helpers.chunk_closure(opt, model, x, y, 2, case.closure), chunks=2)
    torch.manual_seed(0)
    opt2.step(helpers.make_closure(opt2, model2, x, y, case.closure))
    if opt.perturbed_steps == 0:
        pytest.skip(f"{case.id}: no perturbed pass at the first step")
    diff = helpers.max_abs_diff(helpers.params_of(model), helpers.params_of(model2))
    assert diff > 1e-8, f"{case.id}: two chunks gave the full-batch step ({diff:.3e})"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_one_chunk_is_the_plain_step(case: Case) -> None:
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    model2, opt2, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    schedulers = build_schedulers(case, opt, opt2)
    for i, (x, y) in enumerate(helpers.batches(3, torch.float64)):
        torch.manual_seed(i)
        opt.step(helpers.chunk_closure(opt, model, x, y, 1, case.closure), chunks=1)
        torch.manual_seed(i)
        opt2.step(helpers.make_closure(opt2, model2, x, y, case.closure))
        for scheduler in schedulers:
            scheduler.step()
    helpers.assert_tree_equal(helpers.params_of(model), helpers.params_of(model2))
    helpers.assert_tree_equal(opt.state_dict(), opt2.state_dict())


@pytest.mark.parametrize(
    ("chunks", "error", "match"),
    [(0, ValueError, "Invalid chunks value: 0"), (2.0, TypeError, "chunks must be an int"), (True, TypeError, "chunks")],
)
def test_bad_chunks(chunks: object, error: type[Exception], match: str) -> None:
    model, opt, _, _ = build_pair(CASES[0], "sgd", CASES[0].second_group)
    x, y = helpers.batches(1, torch.float64)[0]
    w0 = helpers.params_of(model)
    with pytest.raises(error, match=match):
        opt.step(helpers.chunk_closure(opt, model, x, y, 2), chunks=chunks)  # type: ignore[arg-type]
    helpers.assert_tree_equal(helpers.params_of(model), w0)


def test_nonfinite_chunk_skips_the_whole_step() -> None:
    """An inf in the second chunk's perturbed pass: the step is skipped, the
    weights are exactly w (the first chunk's perturbation was undone) and
    the base optimizer's state is untouched."""
    case = CASES[0]
    model, opt, _, _ = build_pair(case, "sgd-momentum", case.second_group)
    x, y = helpers.batches(2, torch.float64)[0]
    opt.step(helpers.chunk_closure(opt, model, x, y, 2), chunks=2)
    w0, state0 = helpers.params_of(model), helpers.clone_tree(opt.state_dict())
    calls = []
    base = helpers.chunk_closure(opt, model, x, y, 2)

    def closure(i: int) -> torch.Tensor:
        calls.append(i)
        loss = base(i)
        if len(calls) == 4:  # chunk 1, perturbed pass
            next(model.parameters()).grad[0, 0] = float("inf")
        return loss

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure, chunks=2)
    assert calls == [0, 0, 1, 1]
    assert opt.skipped_steps == 1 and opt.step_count == 1
    helpers.assert_tree_equal(helpers.params_of(model), w0)
    helpers.assert_tree_equal(opt.state_dict(), {**state0, "flatminima": {**state0["flatminima"], "counters": opt.counters}})
