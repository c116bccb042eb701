"""PyTorch Lightning support (optional: ``pip install lightning``).

Automatic optimization needs nothing from here: Lightning calls
``optimizer.step(closure=...)`` and every flatminima optimizer runs its
passes through that closure (docs/lightning.md). Nor does
``strategy="ddp"``: an optimizer given ``model=self`` finds the DDP wrapper
Lightning put around the module (``_replicas.ddp_module``), so eps is per
replica as under plain DDP. What Lightning's own fp16
plugin cannot do is hand the closure *and* its GradScaler to the optimizer:
``MixedPrecision.optimizer_step`` runs the closure once and then calls
``scaler.step(optimizer)`` without it. :class:`SharpnessAwareMixedPrecision`
is that plugin with the one change::

    trainer = lightning.pytorch.Trainer(
        accelerator="gpu",
        plugins=[flatminima.lightning.SharpnessAwareMixedPrecision("16-mixed", "cuda")],
    )
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from lightning.pytorch.plugins.precision import MixedPrecision

from ._base import SharpnessAware

__all__ = ["SharpnessAwareMixedPrecision"]


class SharpnessAwareMixedPrecision(MixedPrecision):
    """Lightning's ``MixedPrecision`` whose fp16 step goes through
    ``optimizer.step(closure, scaler=scaler)`` for flatminima optimizers.

    Lightning's closure already scales the loss
    (``MixedPrecision.pre_backward``); the optimizer unscales each pass,
    skips the whole step on an inf/NaN in either pass and calls
    ``scaler.update()`` once. Other optimizers, and bf16 (no scaler), take
    Lightning's own path. ``gradient_clip_val`` is refused with a
    flatminima optimizer: Lightning would clip the scaled gradient of each
    pass; use the optimizer's ``max_grad_norm=``, which clips the unscaled
    update. The gradients ``on_before_optimizer_step`` sees are still
    scaled (the optimizer unscales them afterwards).
    """

    def optimizer_step(  # type: ignore[override]
        self, optimizer: Any, model: Any, closure: Callable[[], Any], **kwargs: Any
    ) -> Any:
        if self.scaler is None or not isinstance(optimizer, SharpnessAware):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        if model.trainer.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val would clip the scaled gradient of each pass; use the flatminima "
                "optimizer's max_grad_norm= (it clips the unscaled update)"
            )
        closure = partial(self._wrap_closure, model, optimizer, closure)  # Lightning's hooks after each pass
        return optimizer.step(closure=closure, scaler=self.scaler, **kwargs)
