"""A flatminima optimizer under Hugging Face accelerate.

accelerate wraps every optimizer it prepares in an ``AcceleratedOptimizer``
whose ``step`` cannot serve a two-pass method: inside
``accelerator.accumulate(model)`` it drops the closure of every micro-batch
but the last, and under fp16 it hands the closure to ``GradScaler.step``,
which unscales the clean gradient once and never the perturbed one.
:class:`SharpnessAwareAcceleratedOptimizer` is that wrapper with its own
``step``: it defers the closures of the micro-batches of one accumulation
window and, at the window's last micro-batch, runs one sharpness-aware step
over all of them (the clean pass over every micro-batch, ``eps`` from the
accumulated clean gradient, the perturbed pass over the same micro-batches),
driving the accelerator's GradScaler itself.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager

import torch
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from .._base import SharpnessAware
from .._scaling import enabled

__all__ = ["SharpnessAwareAcceleratedOptimizer", "prepare"]

CLOSURE_PATTERN = (
    "the pattern is `with accelerator.accumulate(model): optimizer.step(closure)` with a closure that runs "
    "the forward, calls accelerator.backward(loss) and returns the loss (docs/hf.md#accelerate)"
)


class SharpnessAwareAcceleratedOptimizer(AcceleratedOptimizer):
    """accelerate's optimizer wrapper around a flatminima optimizer.

    ``step(closure)`` inside ``accelerator.accumulate(model)`` keeps the
    closure of each micro-batch until the accumulation window ends; then it
    runs one sharpness-aware step whose passes call every kept closure in
    order (the gradients accumulate; all but the last run under the DDP
    module's ``no_sync()``). A closure's ``optimizer.zero_grad()`` is a
    no-op while it is replayed: the step zeroes once per pass. Returns the
    summed clean loss at the window's end and None before it.

    Memory: the kept closures hold their micro-batches' inputs (no
    activations) until the window ends: one accumulation window of inputs.

    The accelerator's GradScaler (or ``scaler=``) is handed to the
    flatminima step, which unscales both passes, skips the whole step on an
    inf/NaN in either and calls ``update()`` once; ``step_was_skipped`` says
    whether the step was skipped (accelerate then holds the LR scheduler).
    """

    def __init__(self, optimizer: SharpnessAware, accelerator: Accelerator, scaler: Any = None) -> None:
        if not isinstance(optimizer, SharpnessAware):
            raise TypeError(
                f"SharpnessAwareAcceleratedOptimizer wraps a flatminima optimizer, got {type(optimizer).__name__}; "
                "prepare other optimizers with accelerator.prepare"
            )
        if scaler is not None and accelerator.scaler is not None and scaler is not accelerator.scaler:
            raise ValueError("scaler= given while the accelerator has a GradScaler of its own; drop scaler=")
        enabled(scaler)  # type check
        # accelerate's own scaler machinery (patched step, scaler.step) stays off: this step drives the scaler
        super().__init__(optimizer, device_placement=accelerator.device_placement, scaler=None)
        self.accelerator = accelerator
        self.grad_scaler = scaler if scaler is not None else accelerator.scaler
        if scaler is not None:
            accelerator.scaler = scaler  # accelerator.backward scales the loss with the scaler the step unscales
        self._closures: list[Callable[[], Any]] = []
        self._replaying = False
        #: set by SharpnessAwareTrainer once its training_step took the step: the Trainer's step() is then a no-op
        self.step_taken = False
        #: the summed clean and perturbed losses of the last step (perturbed: None without a perturbed pass)
        self.last_losses: tuple[Tensor | None, Tensor | None] = (None, None)
        self._is_accelerate_prepared = True  # accelerator.prepare keeps this wrapper as it is

    @property
    def sharpness_aware(self) -> SharpnessAware:
        """The wrapped flatminima optimizer."""
        return self.optimizer  # type: ignore[no-any-return]

    def zero_grad(self, set_to_none: bool | None = None) -> None:
        if not self._replaying:  # a replayed closure's zero_grad would undo the window's accumulation
            super().zero_grad(set_to_none)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        if closure is None and self.step_taken:
            self.step_taken = False  # the Trainer's own step() after the step its training_step took
            return None
        if closure is None:
            raise ValueError(
                f"{type(self.optimizer).__name__} under accelerate needs optimizer.step(closure): a "
                f"sharpness-aware step runs the forward and backward twice; {CLOSURE_PATTERN}"
            )
        if not callable(closure):
            raise TypeError(f"closure must be callable, got {type(closure).__name__}")
        self._closures.append(closure)
        if not self.gradient_state.sync_gradients:
            return None  # the accumulation window goes on: this micro-batch runs with the window's step
        closures, self._closures = self._closures, []
        losses: list[Tensor] = []
        sa = self.sharpness_aware
        taken = sa.step_count
        loss = sa.step(lambda: self._replay(closures, losses), scaler=self.grad_scaler)
        self._is_overflow = sa.step_count == taken  # skipped: accelerate holds the LR scheduler
        self.last_losses = (losses[0] if losses else None, losses[1] if len(losses) > 1 else None)
        return loss

    def forget_window(self) -> None:
        """Drop the closures kept for an unfinished accumulation window (end of an epoch cut short)."""
        self._closures = []

    def _replay(self, closures: list[Callable[[], Any]], losses: list[Tensor]) -> Any:
        """One pass of the step: zero once, then every micro-batch's forward and backward."""
        self.sharpness_aware.zero_grad(set_to_none=True)  # (accelerate's zero_grad inspects a signature per call)
        total: Any = None
        for i, closure in enumerate(closures):
            with self._local() if i < len(closures) - 1 else nullcontext(), self._replay_context():
                loss = closure()
            part = loss.detach() if isinstance(loss, Tensor) else loss
            total = part if total is None else total + part
        if isinstance(total, Tensor):
            losses.append(total)
        return total

    def _local(self) -> ContextManager[Any]:
        """DDP's no_sync() for every micro-batch of a pass but its last (one all-reduce per pass)."""
        model = self.sharpness_aware.model
        return model.no_sync() if isinstance(model, DistributedDataParallel) else nullcontext()

    @contextmanager
    def _replay_context(self) -> Iterator[None]:
        self._replaying = True
        try:
            with torch.enable_grad():
                yield
        finally:
            self._replaying = False


def prepare(accelerator: Accelerator, *objects: Any, scaler: Any = None) -> Any:
    """``accelerator.prepare(*objects)`` with every flatminima optimizer among them
    wrapped in :class:`SharpnessAwareAcceleratedOptimizer`.

    A flatminima optimizer whose ``model=`` is None, or one of the models
    being prepared, gets the prepared model (the DDP module under a
    multi-process launch: per-replica ``eps``, as with plain DDP; running
    statistics from the clean pass). ``scaler``: a ``torch.amp.GradScaler``
    for an accelerator that builds none (fp16 on CPU).
    """
    wrapped = [
        SharpnessAwareAcceleratedOptimizer(o, accelerator, scaler) if isinstance(o, SharpnessAware) else o
        for o in objects
    ]
    if scaler is not None and not any(isinstance(o, SharpnessAwareAcceleratedOptimizer) for o in wrapped):
        raise ValueError("scaler= is for a flatminima optimizer, and none is among the objects to prepare")
    result = accelerator.prepare(*wrapped)
    out = list(result) if isinstance(result, tuple) else [result]
    models = {id(o): p for o, p in zip(objects, out) if isinstance(o, torch.nn.Module)}
    for opt in out:
        if isinstance(opt, SharpnessAwareAcceleratedOptimizer):
            sa = opt.sharpness_aware
            if sa.model is None and len(models) == 1:
                sa.model = next(iter(models.values()))
            elif sa.model is not None and id(sa.model) in models:
                sa.model = models[id(sa.model)]
    return result
