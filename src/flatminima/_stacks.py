"""What a training stack does to ``step(closure)`` that the step cannot serve:
refused before any pass runs, with the way that works named."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

# Frames that may sit between a wrapper's step and ours: LR schedulers wrap
# optimizer.step, and GradScaler.step calls it through _maybe_opt_step.
_PASS_THROUGH = ("torch.optim", "torch.amp", "torch.cuda.amp")


def check_step_call(name: str, closure: Any) -> Callable[..., Any]:
    """The closure of a ``step()``; refused when missing, and when accelerate's own wrapper drives the step."""
    if closure is None:
        raise ValueError(
            f"{name}.step() needs a closure that zeroes the gradients, runs forward and backward and "
            "returns the loss; without one use first_step()/second_step(). (Hugging Face Trainer: use "
            "flatminima.hf.SharpnessAwareTrainer; accelerate: flatminima.hf.prepare(accelerator, ...); "
            "Lightning's precision='16-mixed' calls step() without its closure: use "
            "plugins=[flatminima.lightning.SharpnessAwareMixedPrecision('16-mixed', device)])"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if _called_by_accelerate():
        raise ValueError(
            f"{name} was prepared by accelerator.prepare alone: accelerate's wrapper drops the closures of "
            "accumulated micro-batches, feeds the fp16 closure through GradScaler.step and leaves model= "
            "unwrapped from DDP; prepare it with flatminima.hf.prepare(accelerator, model, optimizer, ...)"
        )
    return closure  # type: ignore[no-any-return]


def _called_by_accelerate() -> bool:
    frame = sys._getframe(3)  # _called_by_accelerate <- check_step_call <- step <- the caller
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == "accelerate.optimizer":
            return True
        if not module.startswith(_PASS_THROUGH):
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return False
