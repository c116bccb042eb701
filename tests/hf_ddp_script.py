"""Run by tests/test_hf.py under ``torchrun --nproc_per_node=2``: SharpnessAwareTrainer
on 2 CPU processes (gloo); each rank saves its weights and the micro-batches it saw."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
from hf_models import build, dataset, weights

from flatminima.hf import SharpnessAwareTrainer

transformers.logging.set_verbosity_error()


class Recording(SharpnessAwareTrainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list[list[dict[str, torch.Tensor]]] = []

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        if not self.batches or len(self.batches[-1]) == self.args.gradient_accumulation_steps:
            self.batches.append([])
        self.batches[-1].append({k: v.detach().clone() for k, v in inputs.items()})
        return super().training_step(model, inputs, num_items_in_batch)


def train(out: Path, options: dict[str, Any]) -> Recording:
    args = transformers.TrainingArguments(
        str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3, learning_rate=0.1,
        optim="sgd", lr_scheduler_type="constant", use_cpu=True, report_to="none", save_strategy="no", seed=0,
        max_grad_norm=0.0, disable_tqdm=True, ddp_backend="gloo", ddp_find_unused_parameters=False,
    )
    trainer = Recording(model=build("bert"), args=args, train_dataset=dataset("bert"), method="sam", method_options=options)
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    return trainer


def main() -> None:
    out = Path(sys.argv[1])
    per_replica = train(out / "a", {})
    sync = train(out / "b", {"sync_perturbations": True})
    rank = dist.get_rank()
    torch.save(
        {"weights": weights(per_replica.model), "batches": per_replica.batches, "no_sync_weights": weights(sync.model)},
        out / f"rank{rank}.pt",
    )


if __name__ == "__main__":
    main()
