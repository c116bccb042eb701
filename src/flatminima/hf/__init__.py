"""Hugging Face support (optional: ``pip install 'flatminima[hf]'``), docs/hf.md.

* :class:`SharpnessAwareTrainer`: ``transformers.Trainer`` with a
  sharpness-aware step (needs transformers);
* :func:`prepare` and :class:`SharpnessAwareAcceleratedOptimizer`: a
  flatminima optimizer under accelerate (needs accelerate alone).
"""

from __future__ import annotations

from typing import Any

from ._accelerate import SharpnessAwareAcceleratedOptimizer, prepare

__all__ = ["SharpnessAwareAcceleratedOptimizer", "SharpnessAwareTrainer", "prepare"]


def __getattr__(name: str) -> Any:
    if name == "SharpnessAwareTrainer":  # transformers only when asked for: accelerate users need not have it
        from .trainer import SharpnessAwareTrainer

        return SharpnessAwareTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
