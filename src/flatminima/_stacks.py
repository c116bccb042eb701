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
        refuse_dcp_helpers(name, depth=3)  # torch's helpers initialise state with step(closure=None)
        raise ValueError(
            f"{name}.step() needs a closure that zeroes the gradients, runs forward and backward and "
            "returns the loss; without one use first_step()/second_step(). (Hugging Face Trainer: use "
            "flatminima.hf.SharpnessAwareTrainer; accelerate: flatminima.hf.prepare(accelerator, ...); "
            "Lightning's precision='16-mixed' calls step() without its closure: use "
            "plugins=[flatminima.lightning.SharpnessAwareMixedPrecision('16-mixed', device)])"
        )
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    if _called_by("accelerate.optimizer", depth=3):  # _called_by <- here <- step <- its caller
        raise ValueError(
            f"{name} was prepared by accelerator.prepare alone: accelerate's wrapper drops the closures of "
            "accumulated micro-batches, feeds the fp16 closure through GradScaler.step and leaves model= "
            "unwrapped from DDP; prepare it with flatminima.hf.prepare(accelerator, model, optimizer, ...)"
        )
    return closure  # type: ignore[no-any-return]


def refuse_dcp_helpers(name: str, depth: int = 2) -> None:
    """Refuse a call from ``torch.distributed.checkpoint.state_dict``'s optimizer helpers (``depth``:
    frames from this function up to the method's caller; 2 when that method calls this). They read one optimizer's ``state`` and
    ``param_groups`` (here the momentum lives in ``base_optimizer``: they would save ``state: {}``)
    and call ``step()`` without a closure to initialise state; flatminima.distributed's serve instead."""
    if _called_by("torch.distributed.checkpoint.state_dict", depth + 1):
        raise TypeError(
            f"torch.distributed.checkpoint.state_dict's optimizer helpers cannot save or load {name}: its "
            "per-parameter state lives in two optimizers (the base optimizer's momentum, the method's own) and its "
            "step() needs a closure; use flatminima.distributed.get_optimizer_state_dict(model, opt) and "
            "set_optimizer_state_dict(model, opt, state_dict), which take the same arguments (docs/distributed.md)"
        )


def _called_by(caller: str, depth: int) -> bool:
    """Whether the frame ``depth`` frames up from this one (0) runs in the module ``caller``, or
    reaches it through the wrappers of ``_PASS_THROUGH`` (LR schedulers, the optimizer's step hooks)."""
    frame = sys._getframe(depth)
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module == caller:
            return True
        if not module.startswith(_PASS_THROUGH):
            return False
        frame = frame.f_back  # type: ignore[assignment]
    return False
