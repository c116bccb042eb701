"""ESAM: stochastic weight perturbation (an ascent) and sharpness-sensitive data selection."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from . import _tensorops as T, _validate as V
from ._base import SharpnessAware
from ._context import GroupView, StepContext
from ._options import Option
from ._parts import Ascent
from ._sharding import same_on_every_rank
from ._selection import SampleSelection, step_seed

__all__ = ["ESAM", "Mask", "step_seed"]


class Mask(Ascent):
    """``eps_j = (rho / beta) g_j / ||g_A||`` on a random subset ``A`` of the tensors, 0 elsewhere."""

    name = "esam"
    options = {
        "beta": Option(0.5, V.above_zero, "probability a tensor is perturbed"),
        "gamma": Option(0.5, V.above_zero, "fraction of the batch kept", wide=True),
        "seed": Option(None, V.optional_seed, "seed of the tensor masks", wide=True, saved=False),
        "skip_inactive_grads": Option(True, V.flag, "no clean gradients for unperturbed tensors", wide=True),
    }
    counts_steps = True
    reads_gradient = True  # the mask acts on the clean gradient, the selection on the clean losses
    feature = SampleSelection  # the data selection and the backward saving

    def product_defaults(self, combine: str, schedule: str) -> dict[str, Any]:
        # the backward saving leaves masked tensors without a clean gradient: only where nothing else reads it
        return {} if (combine, schedule) == ("sam", "always") else {"skip_inactive_grads": False}

    def init(self, opt: Any) -> None:
        opt.method_state["seed"] = torch.initial_seed() if opt.seed is None else opt.seed
        opt.check_skip_inactive_grads()
        same_on_every_rank(opt._shards, opt.method_state["seed"])

    def needs_whole_tensors(self, opt: SharpnessAware, group: Mapping[str, Any]) -> str | None:
        return "its mask draws one coin per parameter tensor"

    def radius(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, radius: Any) -> Any:
        return radius / view.group["beta"]

    def vector(self, opt: Any, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if "active" not in ctx.extra:
            mask = opt.tensor_mask()
            ctx.extra["active"] = None if mask is None else dict(zip(map(id, opt._all_params()), mask))
        active = ctx.extra["active"]
        off = [] if active is None else [g for p, g in zip(view.params, view.grads) if not active[id(p)]]
        T.zero_(off, ctx.foreach)  # gradients computed anyway (explicit API): eps_j = 0
        return bool(off)  # else the view holds active tensors only: ||g|| is ||g_A||


class ESAM(SampleSelection, SharpnessAware):
    r"""Efficient SAM: perturb a random subset of the tensors, descend on the samples that sharpen most.

    Each step, with ``t`` the number of steps taken so far::

        u_j   ~ U[0, 1)  for every parameter tensor j      # torch.Generator seeded with step_seed(seed, t)
        A     = {j : u_j < beta_j}                         # perturbed ("active") tensors
        g     = grad L_B(w)            (tensors not in A compute no gradient)
        eps_j = (rho / beta) * g_j / (||g_A|| + eps0)  for j in A,  0 otherwise
        s_i   = l_i(w + eps) - l_i(w)                      # no-grad forward, per sample i in B
        B+    = the floor(gamma |B|) samples of largest s_i (at least 1), in batch order
        g_p   = grad L_{B+}(w + eps)                       # mean loss over B+
        w     = Base(w, g_p)

    ``||g_A||`` is global over the active tensors of every group; ``rho`` and
    ``beta`` are per group (``rho / beta`` is the group's radius, so
    ``||eps|| = rho / beta`` in one group). ``gamma`` is one value for the
    whole optimizer. With ``gamma = 1`` there is no data selection and no
    extra forward; ``beta = gamma = 1`` is SAM bit for bit.

    When the draw perturbs none of the tensors the loss depends on, the
    step has ``eps = 0`` (the base optimizer's step on the gradient at
    ``w``): with no trainable tensor active nothing is masked; with only
    unused tensors active the clean loss has no graph, and ESAM skips the
    clean backward (per-sample form) or runs the clean pass again without
    the mask (PyTorch's form, whose own ``backward`` fails; with ``model=``
    the running statistics are restored first).

    **The closure.** ``step(closure)`` accepts two forms, told apart by
    what the closure returns:

    * per-sample losses (needed for ``gamma < 1``)::

          def closure(indices=None):
              xb, yb = (x, y) if indices is None else (x[indices], y[indices])
              return F.cross_entropy(model(xb), yb, reduction="none")

      It runs the forward pass on the batch, or on the samples ``indices``
      (a LongTensor) when given, and returns the unreduced 1-D losses as
      computed (not detached). It does not zero gradients nor call
      ``backward``: ESAM does, on the mean of what it returns. ESAM calls
      it ``closure()`` at ``w`` (tensors outside ``A`` with
      ``requires_grad=False``), ``closure()`` under ``torch.no_grad()`` at
      ``w + eps`` to rank the samples (only when ``gamma < 1``), and
      ``closure(indices)`` at ``w + eps``. ``step`` returns the mean clean
      loss. Each call must compute the same function of the batch (no
      dropout noise between them, or the ranking measures the noise).
    * PyTorch's form (zero the gradients, forward, backward, return the
      loss), as for every other method: stochastic weight perturbation
      only, so ``gamma`` must be 1; two calls per step.

    **The explicit API** does stochastic weight perturbation; the clean
    pass skips the masked tensors' gradients when run inside
    :meth:`clean_pass`, and data selection is one call away with
    :meth:`select_samples`::

        with opt.clean_pass():
            losses = F.cross_entropy(model(x), y, reduction="none")
            if losses.requires_grad:   # False if the mask hides every tensor the loss uses
                losses.mean().backward()
        if opt.first_step(zero_grad=True):
            with torch.no_grad():
                after = F.cross_entropy(model(x), y, reduction="none")
            idx = opt.select_samples(losses.detach(), after)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.second_step(zero_grad=True)

    Without ``clean_pass()`` the masked tensors' clean gradients are
    computed and ignored (same step, no saving).

    The mask of step ``t`` comes from a ``torch.Generator`` seeded with
    :func:`step_seed` ``(seed, t)`` (one ``torch.rand(n_tensors,
    dtype=float64)`` over every parameter of every group, in order), so it
    is the same in both APIs, a step skipped for a non-finite gradient is
    retried with the same mask, and ``seed`` and ``t`` — two integers in
    ``method_state``, saved by ``state_dict()`` — make a resumed run
    continue bit for bit.

    Formulas, special cases and departures: docs/algorithms.md#10-esam.

    Args:
        rho: neighbourhood radius before the ``1/beta`` rescale (default 0.05).
        beta: probability that a tensor is perturbed, in ``(0, 1]``
            (default 0.5).
        gamma: fraction of the batch kept for the perturbed pass, in
            ``(0, 1]`` (default 0.5). One value for the whole optimizer,
            saved with the state dict's options.
        seed: seed of the tensor masks (default None: ``torch.initial_seed()``,
            so ``torch.manual_seed`` makes runs reproducible). Saved in the
            state dict: a loaded state dict's seed replaces this one.
        skip_inactive_grads: in the clean pass, switch ``requires_grad`` off
            on the tensors this step does not perturb, so that their weight
            gradients are not computed (default True: the paper's backward
            saving). False computes and ignores them (the same step): use
            it with ``torch.compile``, which compiles the model again for
            every new mask pattern. Under DDP (``model=`` the DDP module)
            the gradients are always computed.
        @shared_args@

    Cost per step: one forward-backward pass whose backward skips the
    weight gradients of about ``1 - beta`` of the tensors, one forward
    without gradients (when ``gamma < 1``) and one forward-backward pass on
    ``gamma |B|`` samples: about ``1 + 1/3 + gamma`` passes before the
    backward saving (three closure calls). Memory: one copy of the
    parameters during the step (the saved ``w``), none between steps.

    Example:
        >>> import torch, torch.nn.functional as F
        >>> import flatminima
        >>> model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        >>> x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        >>> opt = flatminima.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5,
        ...                       seed=0, lr=0.1, momentum=0.9)
        >>> def closure(indices=None):
        ...     xb, yb = (x, y) if indices is None else (x[indices], y[indices])
        ...     return F.cross_entropy(model(xb), yb, reduction="none")
        >>> for _ in range(3):
        ...     loss = opt.step(closure)   # mean clean loss
        >>> opt.step_count
        3

    Reference:
        Du, Yan, Feng, Zhou, Zhen, Goh, Tan. Efficient Sharpness-aware
        Minimization for Improved Training of Neural Networks. ICLR 2022,
        arXiv:2110.03141. Official code: dydjw9/Efficient_SAM ``utils/Esam.py``.

    Departures: the official code keeps the samples whose sharpness is
    strictly above the ``floor(gamma |B|)``-th largest, i.e. one fewer than
    ``floor(gamma |B|)`` (without ties); here exactly ``floor(gamma |B|)``
    samples are kept (at least one), as the paper's ``|B+| = gamma |B|``
    says. The official code runs the no-grad forward even when it keeps
    the whole batch (``gamma >= 0.99``); here ``gamma = 1`` runs no extra
    forward, and any ``gamma < 1`` that keeps fewer than ``|B|`` samples
    selects. The masks come from a seeded generator per step instead of
    Python's global ``random``, and the official code leaves the next
    step's masked tensors with ``requires_grad=False`` between steps; here
    ``requires_grad`` is changed only during the clean pass and always
    restored. Denominator offset 1e-12 (library-wide; official 1e-7).
    """
    ascent = (Mask(),)
