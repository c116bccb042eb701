"""``transformers.Trainer`` with a sharpness-aware step (docs/hf.md)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer

from .. import _tensorops as T, _validate as V
from .._base import SharpnessAware
from ..registry import create, get_method
from ._accelerate import SharpnessAwareAcceleratedOptimizer

__all__ = ["SharpnessAwareTrainer"]


class SharpnessAwareTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer step is sharpness-aware.

    Args:
        method: a registered method (``flatminima.list_methods()``), built
            around the base optimizer that ``TrainingArguments.optim`` names
            (``adamw_torch`` by default) with the Trainer's param groups
            (no weight decay for biases and norms), learning rate, betas and
            weight decay. Ignored when ``optimizers=(opt, scheduler)`` hands
            a flatminima optimizer over.
        method_options: the method's hyperparameters (``{"rho": 0.1}``).
        *args, **kwargs: those of ``transformers.Trainer``.

    One optimizer step is one sharpness-aware step over the
    ``gradient_accumulation_steps`` micro-batches: the clean pass runs over
    all of them, ``eps`` comes from the accumulated gradient, the perturbed
    pass runs over the same micro-batches (held until the step: one window
    of inputs, which the Trainer prefetches anyway). ``max_grad_norm`` clips
    the direction handed to the base optimizer, once (the Trainer's own
    clipping does not run); ``grad_norm`` in the logs is that direction's
    norm after clipping. The logs add ``sharpness`` (mean ``L(w+eps) -
    L(w)`` over the perturbed steps since the last log), ``perturbed_steps``
    and ``skipped_steps``. The optimizer's ``model=`` is the Trainer's
    (wrapped) model: under DDP the clean pass runs under ``no_sync()``, so
    each replica perturbs with its own gradient, as with plain DDP.
    """

    def __init__(
        self, *args: Any, method: str = "sam", method_options: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        get_method(method)  # an unknown name fails here, not at train()
        if method_options is not None and not isinstance(method_options, dict):
            raise TypeError(f"method_options must be a dict, got {type(method_options).__name__}")
        self.sam_method, self.sam_options = method, dict(method_options or {})
        self._sharpness: list[Tensor] = []
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------ the optimizer
    def create_optimizer(self, model: nn.Module | None = None) -> Any:
        if isinstance(self.optimizer, SharpnessAwareAcceleratedOptimizer):
            return self.optimizer
        if self.optimizer is None:
            target = self.model if model is None else model
            if not isinstance(target, nn.Module):
                raise ValueError("SharpnessAwareTrainer needs a model (or model_init) to build its optimizer")
            self.optimizer = self._build(target)
        sa = self.optimizer
        if not isinstance(sa, SharpnessAware):
            raise TypeError(
                f"SharpnessAwareTrainer trains with a flatminima optimizer, got {type(sa).__name__}; pass "
                "method='sam' (or another registered method) or optimizers=(flatminima optimizer, scheduler)"
            )
        self._check(sa)
        self.optimizer = SharpnessAwareAcceleratedOptimizer(sa, self.accelerator)
        return self.optimizer

    def _build(self, model: nn.Module) -> SharpnessAware:
        decay = set(self.get_decay_parameter_names(model))
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [
            {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
            {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
        ]
        base_cls, base_kwargs = self.get_optimizer_cls_and_kwargs(self.args, model)  # type: ignore[arg-type]
        if not (isinstance(base_cls, type) and issubclass(base_cls, torch.optim.Optimizer)):
            raise ValueError(
                f"optim={self.args.optim!r} builds {base_cls!r}, not a torch.optim.Optimizer class a "
                "sharpness-aware method can wrap; choose another optim, or hand an optimizer over with "
                "optimizers=(flatminima optimizer, scheduler)"
            )
        # max_grad_norm comes from the arguments in _check, as for an optimizer handed over
        return create(self.sam_method, [g for g in groups if g["params"]], base_cls, **{**base_kwargs, **self.sam_options})

    def _check(self, sa: SharpnessAware) -> None:
        """What a Trainer step cannot serve, refused before the first step."""
        norm = self.args.max_grad_norm
        if norm:
            V.positive("max_grad_norm", norm)
            if sa.max_grad_norm is None:
                sa.max_grad_norm = float(norm)  # clipping the direction, once
            elif sa.max_grad_norm != norm:
                raise ValueError(
                    f"TrainingArguments.max_grad_norm={norm} and the optimizer's max_grad_norm={sa.max_grad_norm} "
                    "differ; the optimizer clips the direction once: set one of them (max_grad_norm=0 in the "
                    "arguments leaves the optimizer's)"
                )
        if getattr(sa, "gamma", 1.0) != 1.0:
            raise ValueError(
                f"{type(sa).__name__}(gamma={sa.gamma}) selects samples from per-sample losses, which a Trainer's "  # type: ignore[attr-defined]
                "compute_loss does not return; use gamma=1.0 (the weight perturbation alone) under the Trainer, "
                "or the plain loop of docs/methods/esam.md for the data selection"
            )

    @property
    def sharpness_aware_optimizer(self) -> SharpnessAware:
        """The flatminima optimizer (after ``create_optimizer``)."""
        if not isinstance(self.optimizer, SharpnessAwareAcceleratedOptimizer):
            raise ValueError("the optimizer is built when training starts (or by create_optimizer())")
        return self.optimizer.sharpness_aware

    # ------------------------------------------------------------------ the step
    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
    ) -> Tensor:
        opt = self.optimizer
        if not isinstance(opt, SharpnessAwareAcceleratedOptimizer):
            raise ValueError("SharpnessAwareTrainer.training_step runs inside train(), after create_optimizer()")
        sa = opt.sharpness_aware
        if sa.model is None or sa.model is self.model:
            sa.model = model  # the wrapped model: DDP's no_sync() for the clean pass, running stats kept
        parent = super().training_step

        def closure() -> Tensor:
            return parent(model, inputs, num_items_in_batch)  # forward, accelerator.backward, detached loss

        loss = opt.step(closure)
        if loss is None:  # the window goes on; its loss is reported with the window's step
            return torch.zeros((), device=self.args.device)
        opt.step_taken = True
        clean, perturbed = opt.last_losses
        if clean is not None and perturbed is not None:
            self._sharpness.append(perturbed - clean)  # read on the host only when logged
        return loss.detach()  # type: ignore[no-any-return]

    # The step clipped (or not) before the base optimizer stepped; the Trainer must not clip again.
    def _clip_grad_norm(self, model: nn.Module) -> Any:
        return self._direction_norm()

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        return self._direction_norm() if grad_norm is None else grad_norm

    def _direction_norm(self) -> Tensor | None:
        """The norm of the direction in ``.grad``, the one the base optimizer just stepped along
        (after clipping): asked for before the Trainer zeroes the gradients."""
        opt = self.optimizer
        if not isinstance(opt, SharpnessAwareAcceleratedOptimizer):
            return None
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        return T.sum_of_squares(grads, True).sqrt() if grads else None

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if "loss" in logs and isinstance(self.optimizer, SharpnessAwareAcceleratedOptimizer):
            sa = self.optimizer.sharpness_aware
            if self._sharpness:
                logs["sharpness"] = float(torch.stack(self._sharpness).mean())
            self._sharpness = []
            logs["perturbed_steps"] = sa.perturbed_steps
            logs["skipped_steps"] = sa.skipped_steps
        super().log(logs, *args, **kwargs)
