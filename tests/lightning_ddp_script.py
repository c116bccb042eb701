"""Lightning ``Trainer(strategy="ddp", devices=2)`` on CPU (gloo), run by
tests/test_lightning_ddp.py as ``python tests/lightning_ddp_script.py OUT_DIR``.

A script, not a pytest test: Lightning starts rank 1 by re-running this
process's argv (under pytest it would re-run pytest). Every scenario is one
``Trainer.fit`` in the same two processes (the first fit starts the second
process and the process group; the later fits reuse both). Each rank trains
its half of every batch (``x.chunk(2)[rank]``), as tests/test_ddp.py's
plain-DDP workers do, and saves its weights and optimizer state to
``OUT_DIR/rank{r}.pt``.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "src")]

import helpers
import lightning.pytorch as pl
import torch
from methods_db import CASES, Case
from test_reference import build_pair
from torch import nn

import flatminima

STEPS = 3  # tests/test_ddp.py's
WORLD = 2
# One configuration per method in PyTorch's closure form (a training_step
# returns a loss): after the first fit, a fit costs well under a second.
PER_REPLICA = [c.id for c in helpers.one_case_per_method([c for c in CASES if c.closure == "loss"])]
# name -> (case id, options, give the optimizer model=self)
SCENARIOS: dict[str, tuple[str, dict[str, Any], bool]] = {
    **{f"per_replica/{c}": (c, {}, True) for c in PER_REPLICA},
    "sync/sam": ("sam", {"sync_perturbations": True}, True),
    "no_model/sam": ("sam", {}, False),
}


class Shards(pl.LightningModule):
    """build_pair's model and optimizer (tests/test_ddp.py's ``_run_case``),
    trained on this rank's half of each batch."""

    def __init__(self, case: Case, options: dict[str, Any], give_model: bool) -> None:
        super().__init__()
        self.net = build_pair(case, "sgd-momentum", case.second_group)[0]
        self.case, self.options, self.give_model = case, options, give_model
        self.opt: flatminima.SharpnessAware | None = None

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        torch.manual_seed(1000 + self.global_step)  # as tests/test_ddp.py before each step

    def configure_optimizers(self) -> Any:
        groups = helpers.two_groups(self.net, **self.case.second_group)
        self.opt = flatminima.create(
            self.case.method, groups, torch.optim.SGD, lr=0.1, momentum=0.9,
            model=self if self.give_model else None, **self.case.kwargs, **self.options,
        )
        return self.opt

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        shards = [(x.chunk(WORLD)[self.global_rank], y.chunk(WORLD)[self.global_rank])
                  for x, y in helpers.batches(STEPS, torch.float64)]
        return torch.utils.data.DataLoader(shards, batch_size=None, num_workers=0)


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    cases = {c.id: c for c in CASES}
    results: dict[str, Any] = {}
    rank = 0
    for name, (case_id, options, give_model) in SCENARIOS.items():
        assert cases[case_id].scheduler is None  # the module steps none
        module = Shards(cases[case_id], options, give_model)
        trainer = pl.Trainer(
            accelerator="cpu", devices=WORLD, strategy="ddp", max_steps=STEPS, use_distributed_sampler=False,
            enable_progress_bar=False, logger=False, enable_checkpointing=False, enable_model_summary=False,
            num_sanity_val_steps=0,
        )
        trainer.fit(module)
        assert module.opt is not None
        rank = trainer.global_rank
        results[name] = {"params": helpers.params_of(module.net), "state": module.opt.state_dict()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(sys.argv[1])
