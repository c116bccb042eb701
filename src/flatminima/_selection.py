"""ESAM's data selection and backward saving: a feature of the step, not an axis.

With ESAM's tensor mask in a method's ascent, the clean pass can skip the
masked tensors' weight gradients (``skip_inactive_grads``), and a closure
that returns per-sample losses lets the step keep only the samples whose
loss rises most from ``w`` to ``w + eps`` for the perturbed pass (``gamma``).
The clean losses reach the perturbed pass through the step's data
(:meth:`~flatminima.SharpnessAware.note`). See :class:`flatminima.ESAM`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ._replicas import ddp_module
from .passes import snapshot_running_stats

_MASK64 = (1 << 64) - 1
_MASK63 = (1 << 63) - 1


def step_seed(seed: int, step: int) -> int:
    """Seed of the tensor mask of step ``step`` (0-based): SplitMix64 of
    ``seed + (step + 1) * 0x9E3779B97F4A7C15`` (mod 2^64), cut to 63 bits.
    The mask of a step is a pure function of ``(seed, step)``."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) & _MASK63


class SampleSelection:
    """Mixed into a method whose ascent holds ESAM's mask (``esam.Mask``)."""

    gamma: float
    skip_inactive_grads: bool
    param_groups: list[dict[str, Any]]
    method_state: dict[str, Any]
    model: torch.nn.Module | None
    _data: dict[str, Any]
    _shards: Any
    _masked_step: int | None = None  # the step whose clean pass ran with masked tensors

    if TYPE_CHECKING:  # provided by SharpnessAware, which this is mixed into

        def _all_params(self) -> list[Tensor]: ...
        def _replicas(self) -> Any: ...
        def zero_grad(self, set_to_none: bool = True) -> None: ...
        def _backward(self, loss: Tensor) -> None: ...
        def note(self, **values: Any) -> None: ...

    def check_skip_inactive_grads(self) -> None:
        """The clean pass may leave the masked tensors without a gradient only
        when nothing but ``eps`` reads the clean gradient."""
        free = not self.keeps_clean_grad and self.schedule.name == "always" and not self.decides_from_gradient  # type: ignore[attr-defined]
        if self.skip_inactive_grads and not free:
            raise ValueError(
                f"{type(self).__name__}: skip_inactive_grads=True needs SAM's combine and a perturbed pass at "
                "every step (the clean gradient of every tensor is used otherwise); pass skip_inactive_grads=False"
            )

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
        if mask is None or not self.skip_inactive_grads or ddp_module(self.model) is not None or self._shards is not None:
            # DDP hooks each parameter's gradient accumulator once; toggling
            # requires_grad replaces it, and DDP then waits forever for that
            # gradient (FSDP hooks them too). Under DDP and FSDP the masked tensors' clean gradients are
            # computed and ignored (eps_j = 0 all the same; no backward saving).
            return []
        params = self._all_params()
        trainable = sum(p.requires_grad for p in params)
        off = [p for p, active in zip(params, mask) if not active and p.requires_grad]
        return [] if len(off) == trainable else off  # nothing active: mask nothing, eps = 0

    def _may_lack_clean_grad(self) -> bool:
        """Whether this step's clean pass ran masked (:meth:`clean_pass`, or ``step``'s own): a mask
        hiding every tensor the loss uses leaves no gradient at all (eps = 0). An unmasked clean
        pass without any gradient is a missing backward: first_step() refuses it."""
        return self._masked_step == self.method_state["step"]

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
        with self._replicas().local_pass(), self._masked(self._masked_for_clean_pass()):
            yield

    @contextmanager
    def _masked(self, tensors: list[Tensor]) -> Iterator[None]:
        if tensors:
            self._masked_step = self.method_state["step"]
        for p in tensors:
            p.requires_grad_(False)
        try:
            yield
        finally:
            for p in tensors:
                p.requires_grad_(True)

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
            out, per_sample = self._clean_call(closure)
            if not per_sample:
                if self.gamma < 1.0:
                    raise ValueError(
                        f"ESAM with gamma={self.gamma} selects samples: its closure must return per-sample "
                        "losses (see help(flatminima.ESAM)); with PyTorch's closure form use gamma=1"
                    )
                self.note(closure_form="loss", clean_losses=None)
                return out
            losses = out.detach()
            keep = self.kept_samples(losses.numel()) < losses.numel()
            self.note(closure_form="per_sample", clean_losses=losses if keep else None)
            return losses.mean()

        form, clean = self._data.pop("closure_form", None), self._data.pop("clean_losses", None)
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
