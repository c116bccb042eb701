"""Lightning ``Trainer(strategy="ddp")`` on 2 CPU processes gives plain DDP's
eps semantics (docs/lightning.md, "DDP").

tests/lightning_ddp_script.py runs every scenario in one launch (Lightning
re-runs a script's argv to start rank 1, so it cannot run inside pytest).
With ``model=self`` the optimizer finds the DDP wrapper that Lightning put
around the LightningModule: eps is per replica by default, and the weights
equal tests/test_ddp.py's single-process reference of per-replica eps
(``step(closure, chunks=2)``, bit for bit, and tests/reference.py's
``sharded_step``); ``sync_perturbations=True``, or no ``model=``, gives one
global eps, the full-batch step.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

pytest.importorskip("lightning")

import helpers
import lightning_ddp_script as script
import test_ddp  # its single-process references of plain DDP
from methods_db import CASES

BY_ID = {c.id: c for c in CASES}
assert (script.STEPS, script.WORLD) == (test_ddp.STEPS, test_ddp.WORLD)  # the references' set-up


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("lightning_ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, script.__file__, str(out)], check=False, env=env, cwd=out,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(script.WORLD)]


@pytest.mark.parametrize("name", list(script.SCENARIOS))
def test_ranks_end_bit_identical(ranks: list[dict[str, Any]], name: str) -> None:
    a, b = ranks[0][name], ranks[1][name]
    helpers.assert_tree_equal(a["params"], b["params"])
    helpers.assert_tree_equal(a["state"], b["state"])
    assert a["state"]["flatminima"]["counters"]["steps"] == script.STEPS


@pytest.mark.parametrize("case_id", script.PER_REPLICA)
def test_default_is_per_replica_eps(ranks: list[dict[str, Any]], case_id: str) -> None:
    case = BY_ID[case_id]
    got = ranks[0][f"per_replica/{case_id}"]
    diff = helpers.max_abs_diff(got["params"], test_ddp._chunked_run(case))
    assert diff == 0.0, f"{case_id}: Lightning DDP vs chunks=2: max |w - w_ref| = {diff:.3e}"
    diff = helpers.max_abs_diff(got["params"], test_ddp._reference_run(case))
    assert diff <= 1e-10, f"{case_id}: Lightning DDP vs the reference's sharded_step: {diff:.3e}"
    assert got["state"]["flatminima"]["counters"]["perturbed_steps"] > 0
    diff = helpers.max_abs_diff(got["params"], test_ddp._full_batch_run(case))
    if helpers.pre_pass(case.method):  # eps from the momentum, the same on every replica: the global step
        assert diff <= 1e-10, f"{case_id}: a pre-pass eps differs between replicas ({diff:.3e})"
    else:
        assert diff > 1e-9, f"{case_id}: per-replica eps gave the global-eps step ({diff:.3e})"


@pytest.mark.parametrize("name", ["sync/sam", "no_model/sam"])
def test_global_eps_is_the_full_batch_step(ranks: list[dict[str, Any]], name: str) -> None:
    """``sync_perturbations=True`` chooses one global eps; without ``model=``
    the optimizer cannot know the DDP wrapper, and DDP averages both passes."""
    diff = helpers.max_abs_diff(ranks[0][name]["params"], test_ddp._full_batch_run(BY_ID["sam"]))
    assert diff <= 1e-12, f"{name}: vs the full-batch step: {diff:.3e}"
