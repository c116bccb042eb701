"""Tiny Hugging Face models built from configs (nothing from a hub) and their data."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

VOCAB, SEQ, N = 50, 6, 8


def bert(seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, max_position_embeddings=16, num_labels=2,
    )
    return BertForSequenceClassification(cfg)


def gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(cfg)


def dataset(kind: str, n: int = N, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    if kind == "gpt2":
        return [{"input_ids": ids[i], "labels": ids[i]} for i in range(n)]
    labels = torch.randint(0, 2, (n,), generator=g)
    return [{"input_ids": ids[i], "labels": labels[i]} for i in range(n)]


def full_batch(data: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: torch.stack([row[k] for row in data]) for k in data[0]}


def build(kind: str, seed: int = 0) -> nn.Module:
    return {"bert": bert, "gpt2": gpt2}[kind](seed)


def weights(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


def trainer_groups(model: nn.Module) -> list[dict[str, Any]]:
    """The Trainer's two param groups, in its order (ESAM's tensor masks follow the order)."""
    from transformers import Trainer

    decay = set(Trainer.get_decay_parameter_names(None, model))  # type: ignore[arg-type]  # self is unused
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in decay]}, {"params": [p for n, p in named if n not in decay]}]


def plain_loop(
    kind: str, method: str, steps: int, options: dict[str, Any], lr: float = 0.1, bf16: bool = False
) -> tuple[nn.Module, Any, list[float]]:
    """The reference: flatminima's step(closure) on the whole data set, ``steps`` times; returns
    the model, the optimizer and every closure's loss."""
    import flatminima

    model = build(kind)
    model.train()
    opt = flatminima.create(method, trainer_groups(model), torch.optim.SGD, lr=lr, model=model, **options)
    batch = full_batch(dataset(kind))
    if kind == "gpt2":  # the Trainer's token-weighted loss: the labels it counts (all of them, unshifted)
        batch["num_items_in_batch"] = batch["labels"].ne(-100).sum()
    losses: list[float] = []

    def closure() -> torch.Tensor:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # the forward only, as accelerate does
            loss = model(**batch).loss.float()
        loss.backward()
        losses.append(float(loss.detach()))
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model, opt, losses
