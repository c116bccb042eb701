"""Workloads: a model, a fixed random batch and the closure that trains on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

CLOSURE_FORMS = ("loss", "per_sample")

import torch
import torch.nn.functional as F
from torch import nn


class Transformer(nn.Module):
    """Token classifier: embedding + learned positions, ``layers`` x
    ``nn.TransformerEncoderLayer`` (pre-built PyTorch layer, GELU-free
    default ReLU, no dropout), final LayerNorm, mean pooling, linear head.

    Parameter tensors: 12 per encoder layer + embedding + positions + norm (2)
    + head (2), i.e. 102 with 8 layers.
    """

    def __init__(self, vocab: int, d_model: int, nhead: int, layers: int, seq: int, classes: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.pos = nn.Parameter(torch.randn(seq, d_model) * 0.02)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(d_model, nhead, 4 * d_model, dropout=0.0, batch_first=True)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens) + self.pos
        for layer in self.layers:
            h = layer(h)
        return self.head(self.norm(h).mean(dim=1))


def mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


@dataclass
class Workload:
    name: str
    description: str
    model: nn.Module
    x: torch.Tensor
    y: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def n_tensors(self) -> int:
        return len(self.params)

    @property
    def n_params(self) -> int:
        return sum(p.numel() for p in self.params)

    @property
    def param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.params)

    def closure_for(
        self, opt: torch.optim.Optimizer, counter: list[int] | None = None, form: str = "loss"
    ) -> Callable[..., torch.Tensor]:
        """A closure for ``opt.step``.

        ``form="loss"``: PyTorch's convention (zero the grads to None,
        forward, backward, return the loss). ``form="per_sample"``: the form
        some data-selecting methods (ESAM) ask for: ``closure(indices=None)``
        runs the forward on the batch or on ``indices`` and returns the
        unreduced per-sample losses; the method does the backward.
        """
        model, x, y = self.model, self.x, self.y
        if form == "per_sample":

            def per_sample(indices: torch.Tensor | None = None) -> torch.Tensor:
                if counter is not None:
                    counter[0] += 1
                xb, yb = (x, y) if indices is None else (x[indices], y[indices])
                return F.cross_entropy(model(xb), yb, reduction="none")

            return per_sample

        def closure() -> torch.Tensor:
            if counter is not None:
                counter[0] += 1
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return closure

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "param_tensors": self.n_tensors,
            "params": self.n_params,
            "param_bytes": self.param_bytes,
            **self.info,
        }


def transformer_workload(
    device: torch.device,
    *,
    layers: int = 8,
    d_model: int = 128,
    nhead: int = 4,
    seq: int = 32,
    batch: int = 16,
    vocab: int = 1000,
    classes: int = 10,
    seed: int = 0,
) -> Workload:
    torch.manual_seed(seed)
    model = Transformer(vocab, d_model, nhead, layers, seq, classes).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    desc = f"{layers} x nn.TransformerEncoderLayer(d_model={d_model}, nhead={nhead}, ff={4 * d_model}), batch {batch} x {seq} tokens"
    return Workload("transformer", desc, model, x, y, {"batch": batch, "seq": seq, "layers": layers, "d_model": d_model})


def mlp_workload(
    device: torch.device,
    *,
    d_in: int = 256,
    hidden: int = 512,
    depth: int = 3,
    classes: int = 10,
    batch: int = 128,
    seed: int = 0,
) -> Workload:
    torch.manual_seed(seed)
    sizes = [d_in] + [hidden] * depth + [classes]
    model = mlp(sizes).to(device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(batch, d_in, generator=g).to(device)
    y = torch.randint(0, classes, (batch,), generator=g).to(device)
    desc = f"MLP {'-'.join(map(str, sizes))} (ReLU), batch {batch}"
    return Workload("mlp", desc, model, x, y, {"batch": batch, "sizes": sizes})


def workloads(device: torch.device, tiny: bool = False) -> list[Workload]:
    """The benchmark's two models; ``tiny`` shrinks them for the smoke test
    (the transformer keeps >= 100 parameter tensors only in full size)."""
    if tiny:
        return [
            transformer_workload(device, layers=2, d_model=16, nhead=2, seq=8, batch=4, vocab=50),
            mlp_workload(device, d_in=16, hidden=32, depth=2, batch=8),
        ]
    return [transformer_workload(device), mlp_workload(device)]


def build_method(
    wl: Workload,
    name: str,
    base: type[torch.optim.Optimizer],
    counter: list[int] | None = None,
    sync: Callable[[], None] = lambda: None,
    **kwargs: Any,
) -> tuple[Any, Callable[[], Any], str]:
    """``flatminima.create(name, ...)``, one real (warm-up) step, and a step
    function using the closure form of the method's registry record
    (``flatminima.get_method(name).closure``: the form at the defaults)."""
    import flatminima

    form = flatminima.get_method(name).closure
    if form not in CLOSURE_FORMS:
        raise ValueError(f"{name}: unknown closure form {form!r} in the registry")
    opt = flatminima.create(name, wl.params, base, **kwargs)
    closure = wl.closure_for(opt, counter, form)
    opt.step(closure)
    sync()
    return opt, (lambda o=opt, c=closure: o.step(c)), form
