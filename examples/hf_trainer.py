"""SharpnessAwareTrainer on a tiny BERT built from its config (no download).

    python examples/hf_trainer.py --method looksam --accumulate 2

Trains a 2-layer BERT classifier on a synthetic task (is the first token
in the lower half of the vocabulary?) with the Trainer's own loop; every optimizer step is
one sharpness-aware step over the accumulated micro-batches. The log lines
show the clean loss, the sharpness L(w + eps) - L(w), the norm of the
direction the base optimizer took and the step counters.
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from transformers import BertConfig, BertForSequenceClassification, TrainingArguments

import flatminima
from flatminima.hf import SharpnessAwareTrainer


def task(n: int, vocab: int = 64, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (n, length), generator=g)
    labels = (ids[:, 0] < vocab // 2).long()
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def accuracy(prediction: object) -> dict[str, float]:
    logits, labels = prediction.predictions, prediction.label_ids  # type: ignore[attr-defined]
    return {"accuracy": float((logits.argmax(-1) == labels).mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="sam", choices=flatminima.list_methods())
    parser.add_argument("--rho", type=float, default=None, help="the method's radius (its default if omitted)")
    parser.add_argument("--accumulate", type=int, default=2, help="gradient_accumulation_steps")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=16, num_labels=2)
    model = BertForSequenceClassification(config)
    options = {} if args.rho is None else {"rho": args.rho}
    if args.method == "esam":
        options["gamma"] = 1.0  # data selection needs per-sample losses, which the Trainer does not give
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            out, per_device_train_batch_size=16, gradient_accumulation_steps=args.accumulate, max_steps=args.steps,
            learning_rate=1e-3, optim="adamw_torch", logging_steps=10, report_to="none", use_cpu=True,
            save_strategy="no", disable_tqdm=True,
        )
        trainer = SharpnessAwareTrainer(model=model, args=training, train_dataset=task(2048),
                                        eval_dataset=task(512, seed=1), method=args.method, method_options=options,
                                        compute_metrics=accuracy)
        # BERT takes **kwargs but ignores num_items_in_batch: let the Trainer divide each micro-batch's
        # loss by gradient_accumulation_steps (a plain Trainer needs the same)
        trainer.model_accepts_loss_kwargs = False
        trainer.train()
        print(trainer.evaluate())
    opt = trainer.sharpness_aware_optimizer
    print(f"{type(opt).__name__}: {opt.step_count} steps, {opt.perturbed_steps} perturbed, {opt.skipped_steps} skipped")


if __name__ == "__main__":
    main()
