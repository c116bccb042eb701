"""ESAM: stochastic weight perturbation and sharpness-sensitive data selection."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from . import _tensorops as T
from . import _validate as V
from ._base import GroupView, SharpnessAware, StepContext
from . import passes as P
from .passes import snapshot_running_stats

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """Seed of the tensor mask of step ``step`` (0-based): SplitMix64 of
    ``seed + (step + 1) * 0x9E3779B97F4A7C15`` (mod 2^64), cut to 63 bits.

    The mask of a step is a pure function of ``(seed, step)``, so the state
    that reproduces every future mask is two integers.
    """
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int or None, got {value!r} of type {type(value).__name__}")
    if not 0 <= value <= _MASK64:
        raise ValueError(f"Invalid seed value: {value} (must be in [0, 2**64))")
    return value


class ESAM(SharpnessAware):
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

    Args:
        params: parameters or param-group dicts (per-group options allowed).
        base_optimizer: a ``torch.optim.Optimizer`` class or an instance
            built over the same parameters.
        rho: neighbourhood radius before the ``1/beta`` rescale (default 0.05).
        beta: probability that a tensor is perturbed, in ``(0, 1]``
            (default 0.5).
        gamma: fraction of the batch kept for the perturbed pass, in
            ``(0, 1]`` (default 0.5). One value for the whole optimizer; not
            part of the state dict.
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
        norm_eps: denominator offset ``eps0`` (default 1e-12).
        max_grad_norm: clip the direction handed to the base optimizer to
            this global norm (default None).
        foreach: multi-tensor kernels (None: on where supported).
        model: the module, so that ``step(closure)`` keeps BatchNorm running
            statistics from both passes at ``w + eps`` (ranking and
            backward).
        **base_kwargs: the base optimizer's arguments.

    Cost per step: one forward-backward pass whose backward skips the
    weight gradients of about ``1 - beta`` of the tensors, one forward
    without gradients (when ``gamma < 1``) and one forward-backward pass on
    ``gamma |B|`` samples: about ``1 + 1/3 + gamma`` passes before the
    backward saving (three closure calls). Memory: one copy of the
    parameters during the step (the saved ``w``), none between steps.

    Example::

        import torch, torch.nn.functional as F
        import flatminima

        model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
        x, y = torch.randn(64, 10), torch.randint(0, 3, (64,))
        opt = flatminima.ESAM(model.parameters(), torch.optim.SGD, rho=0.05, beta=0.5, gamma=0.5,
                              seed=0, lr=0.1, momentum=0.9)

        def closure(indices=None):
            xb, yb = (x, y) if indices is None else (x[indices], y[indices])
            return F.cross_entropy(model(xb), yb, reduction="none")

        for _ in range(10):
            loss = opt.step(closure)   # mean clean loss

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

    method_options = SharpnessAware.method_options + ("gamma", "skip_inactive_grads")
    group_checks = {
        "rho": V.non_negative,
        "beta": partial(V.in_range, low=0.0, high=1.0, low_open=True),
        "norm_eps": V.positive,
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        *,
        rho: float = 0.05,
        beta: float = 0.5,
        gamma: float = 0.5,
        seed: int | None = None,
        skip_inactive_grads: bool = True,
        norm_eps: float = 1e-12,
        max_grad_norm: float | None = None,
        foreach: bool | None = None,
        model: torch.nn.Module | None = None,
        **base_kwargs: Any,
    ) -> None:
        self.gamma = V.in_range("gamma", gamma, 0.0, 1.0, low_open=True)
        self.skip_inactive_grads = V.flag("skip_inactive_grads", skip_inactive_grads)
        seed = torch.initial_seed() if seed is None else _seed(seed)
        defaults = dict(rho=rho, beta=beta, norm_eps=norm_eps)
        super().__init__(
            params, base_optimizer, defaults, model=model, max_grad_norm=max_grad_norm, foreach=foreach, **base_kwargs
        )
        self.method_state.update(step=0, seed=seed)
        # between the two passes of one step(closure) call only
        self._closure_form: str | None = None
        self._clean_losses: Tensor | None = None

    # ------------------------------------------------------------------ SWP: the tensor mask
    def tensor_mask(self) -> list[bool] | None:
        """Which parameter tensors (every group's, in order) the current step
        perturbs; None when every group has ``beta = 1``."""
        groups = self.param_groups
        if all(g["beta"] >= 1.0 for g in groups):
            return None
        betas = [g["beta"] for g in groups for _ in g["params"]]
        gen = torch.Generator().manual_seed(step_seed(self.method_state["seed"], self.method_state["step"]))
        u = torch.rand(len(betas), generator=gen, dtype=torch.float64).tolist()
        return [ui < b for ui, b in zip(u, betas)]

    def _masked_for_clean_pass(self) -> list[Tensor]:
        mask = self.tensor_mask()
        if mask is None or not self.skip_inactive_grads or P.ddp_module(self.model) is not None:
            # DDP hooks each parameter's gradient accumulator once; toggling
            # requires_grad replaces it, and DDP then waits forever for that
            # gradient. Under DDP the masked tensors' clean gradients are
            # computed and ignored (eps_j = 0 all the same; no backward saving).
            return []
        params = self._all_params()
        trainable = sum(p.requires_grad for p in params)
        off = [p for p, active in zip(params, mask) if not active and p.requires_grad]
        return [] if len(off) == trainable else off  # nothing active: mask nothing, eps = 0

    @contextmanager
    def clean_pass(self) -> Iterator[None]:
        """Context for the clean forward/backward of the explicit API: the
        tensors this step does not perturb get ``requires_grad=False``
        inside it (restored on exit), so their weight gradients are not
        computed. ``step(closure)`` does this itself.

        When the draw masks every tensor the loss depends on (small models,
        or unused parameters that happen to be the only active ones), the
        loss has no graph: skip the backward (``if loss.requires_grad:``);
        the step then has ``eps = 0``.
        """
        with self._local_pass(), self._masked(self._masked_for_clean_pass()):
            yield

    @staticmethod
    @contextmanager
    def _masked(tensors: list[Tensor]) -> Iterator[None]:
        for p in tensors:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in tensors:
                p.requires_grad_(True)

    def _radius(self, ctx: StepContext, view: GroupView) -> float | Tensor:
        return view.group["rho"] / view.group["beta"]

    def _ascent_vector(self, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        if "active" not in ctx.extra:
            mask = self.tensor_mask()
            ctx.extra["active"] = None if mask is None else dict(zip(map(id, self._all_params()), mask))
        active: Mapping[int, bool] | None = ctx.extra["active"]
        if active is None:
            return False
        off = [g for p, g in zip(view.params, view.grads) if not active[id(p)]]
        if not off:
            return False  # the view holds active tensors only: ||g|| is ||g_A||
        T.zero_(off, ctx.foreach)  # gradients computed anyway (explicit API): eps_j = 0
        return True

    def _post_step(self, ctx: StepContext) -> None:
        self.method_state["step"] += 1

    # ------------------------------------------------------------------ SDS: the data selection
    def kept_samples(self, batch_size: int) -> int:
        """``max(1, floor(gamma * batch_size))``: samples kept for the perturbed pass."""
        return max(1, math.floor(self.gamma * batch_size))

    def select_samples(self, clean_losses: Tensor, perturbed_losses: Tensor) -> Tensor:
        """Indices (in batch order) of the ``kept_samples(|B|)`` samples whose
        loss rises most from ``w`` to ``w + eps``; every index when that is the
        whole batch. NaN rises count as the largest."""
        clean, after = clean_losses.detach(), perturbed_losses.detach()
        if clean.dim() != 1 or after.shape != clean.shape:
            raise ValueError(
                f"select_samples needs two 1-D per-sample loss tensors of one shape, got {tuple(clean.shape)} "
                f"and {tuple(after.shape)}"
            )
        n = clean.numel()
        keep = self.kept_samples(n)
        if keep >= n:
            return torch.arange(n, device=clean.device)
        return torch.topk(after - clean, keep).indices.sort().values

    # ------------------------------------------------------------------ the closure
    @staticmethod
    def _per_sample(out: Any, masked: bool = False) -> bool:
        """True for the per-sample form (a 1-D tensor), False for PyTorch's.
        ``masked``: the clean pass masked tensors, so losses without a graph
        are allowed (every tensor they depend on may be masked)."""
        if not isinstance(out, Tensor) or out.dim() == 0:
            return False
        if out.dim() > 1:
            raise ValueError(
                f"ESAM: the closure returned a tensor of shape {tuple(out.shape)}; return the per-sample "
                "losses (1-D, reduction='none') or, in PyTorch's form, the loss after backward"
            )
        if not out.requires_grad and not masked:
            raise ValueError(
                "ESAM: the closure returned per-sample losses that do not require grad; return them as "
                "computed (unreduced, not detached) and do not call backward: ESAM does"
            )
        return True

    def _clean_call(self, closure: Callable[..., Any]) -> tuple[Any, bool]:
        """The clean pass with the tensor mask: (what the closure returned,
        whether it is the per-sample form)."""
        masked = self._masked_for_clean_pass()
        restore = snapshot_running_stats(self.model) if masked and self.model is not None else None
        self.zero_grad()
        try:
            with self._masked(masked), torch.enable_grad():
                out = closure()
                per_sample = self._per_sample(out, masked=bool(masked))
                if per_sample and out.requires_grad:
                    self._backward(out.mean())
                # per-sample losses without a graph: the mask hides every tensor
                # they depend on; no clean gradient, so eps = 0 this step
            return out, per_sample
        except RuntimeError as err:
            if not masked or "does not require grad" not in str(err):
                raise
        # PyTorch's form: the closure's backward found no graph because the mask
        # hides every tensor the loss depends on. Run the pass again without
        # the mask (the masked tensors' gradients are then zeroed: eps = 0).
        if restore is not None:
            restore()  # the failed forward moved the running statistics
        self.zero_grad()
        with torch.enable_grad():
            out = closure()
            per_sample = self._per_sample(out)
            if per_sample:
                self._backward(out.mean())
        return out, per_sample

    def _run_closure(self, closure: Callable[..., Any], which: str) -> Any:
        if which == "clean":
            self._closure_form, self._clean_losses = None, None
            out, per_sample = self._clean_call(closure)
            if not per_sample:
                if self.gamma < 1.0:
                    raise ValueError(
                        f"ESAM with gamma={self.gamma} selects samples: its closure must return per-sample "
                        "losses (see help(flatminima.ESAM)); with PyTorch's closure form use gamma=1"
                    )
                self._closure_form = "loss"
                return out
            self._closure_form = "per_sample"
            losses = out.detach()
            if self.kept_samples(losses.numel()) < losses.numel():
                self._clean_losses = losses
            return losses.mean()

        form, clean = self._closure_form, self._clean_losses
        self._closure_form, self._clean_losses = None, None
        if form != "per_sample":
            with torch.enable_grad():
                return closure()
        indices = None
        if clean is not None:
            with torch.no_grad():
                after = closure()
            if not isinstance(after, Tensor):
                raise ValueError(f"ESAM: the closure returned {type(after).__name__} in the ranking pass")
            indices = self.select_samples(clean, after)
        self.zero_grad()
        with torch.enable_grad():
            out = closure() if indices is None else closure(indices)
            if not self._per_sample(out):
                raise ValueError("ESAM: the closure returned a scalar in the perturbed pass; return per-sample losses")
            self._backward(out.mean())
        return None

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._closure_form, self._clean_losses = None, None
