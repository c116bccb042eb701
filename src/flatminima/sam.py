"""SAM, with ASAM and GCSAM as flags of the same class."""

from __future__ import annotations

from .asam import Adaptive
from ._base import SharpnessAware
from .gcsam import Centralize


class SAM(SharpnessAware):
    r"""Sharpness-Aware Minimization, with ASAM and GCSAM as options.

    Each step, with ``g = grad L(w)`` from the clean pass::

        v   = g                                  # SAM
        v   = T_w * g,  T_w = |w| + eta          # adaptive=True (ASAM, elementwise)
        v   = GC(g)                              # centralize=True (GCSAM)
        eps = rho * v / (||v|| + eps0)           # SAM, GCSAM: ||eps|| = rho
        eps = rho * T_w * v / (||v|| + eps0)     # ASAM: ||T_w^-1 eps|| = rho
        g_p = grad L(w + eps)                    # perturbed pass
        w   = Base(w, g_p)                       # w restored by copy first

    ``||v||`` is global over every parameter of every group; ``rho``,
    ``adaptive``, ``eta``, ``centralize`` and ``norm_eps`` are per group.
    Parts: ascent :class:`~flatminima.gcsam.Centralize` then
    :class:`~flatminima.asam.Adaptive`, combine ``d = g_p``, every step.
    Formulas and departures: docs/algorithms.md#1-sam (ASAM: #2-asam, GCSAM: #3-gcsam).

    Args:
        rho: neighbourhood radius (default 0.05; recommended 0.5 for ASAM
            with eta=0.01, 2.0 for eta-free ASAM).
        @shared_args@

    ``step(closure, scaler=..., chunks=...)`` takes a GradScaler for fp16
    and gives m-sharpness on one device (:meth:`SharpnessAware.step`).
    Weight decay is not part of ``eps``: the base optimizer applies it, as
    PyTorch optimizers do (official SAM puts an L2 term in the loss).

    Memory: one copy of the parameters during the step (``w + eps`` is
    built in the clean gradient's buffer, which the parameters point at
    during the perturbed pass; ASAM's ``T_w`` takes a scratch buffer before
    that), none between steps.

    Example:
        >>> import torch, flatminima
        >>> model = torch.nn.Linear(4, 2)
        >>> x, y = torch.randn(8, 4), torch.randn(8, 2)
        >>> opt = flatminima.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, momentum=0.9)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> loss = opt.step(closure)
        >>> opt.step_count, opt.perturbed_steps
        (1, 1)

    References:
        Foret, Kleiner, Mobahi, Neyshabur. Sharpness-Aware Minimization for
        Efficiently Improving Generalization. ICLR 2021, arXiv:2010.01412.
        ASAM: arXiv:2102.11600. GCSAM: arXiv:2501.11584.

    Departures: the official ASAM normalises only parameters whose name
    contains "weight"; here ``adaptive`` applies to whole groups (see
    :func:`flatminima.split_param_groups` for the official scope).
    """

    ascent = (Centralize(), Adaptive())
