"""One frozen record per method: its class, the defaults that define it and
what it costs. ``create`` and the experiment command read only this table, so
a new method appears everywhere by adding one record here."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from ._base import SharpnessAware
from .ae_sam import AESAM
from .esam import ESAM
from .every_k import SAMEveryK
from .fisher_sam import FisherSAM
from .friendly_sam import FriendlySAM
from .gsam import GSAM
from .looksam import LookSAM
from .momentum_sam import MomentumSAM
from .sam import SAM
from .vasso import VaSSO
from .wsam import WSAM


@dataclass(frozen=True)
class MethodSpec:
    """A registered method.

    ``preset`` holds keyword arguments that define the method on top of its
    class (``asam`` is ``SAM`` with ``adaptive=True, rho=0.5``); a user's
    keyword arguments override it.
    """

    name: str
    cls: type[SharpnessAware]
    summary: str
    paper: str
    preset: Mapping[str, Any] = field(default_factory=dict)
    passes_per_step: float = 2.0  # closure calls per step, on average at the defaults
    extra_copies: int = 1  # parameter-sized buffers at the step's peak
    doc: str = ""
    #: the closure form ``step`` takes at the defaults: "loss" (PyTorch's: zero
    #: grads, forward, backward, return the loss) or "per_sample"
    #: (``closure(indices=None)`` returns the unreduced per-sample losses of the
    #: batch or of the samples ``indices``; the optimizer calls backward)
    closure: str = "loss"

    def defaults(self) -> dict[str, Any]:
        """The method's hyperparameters and their defaults (class defaults + preset)."""
        sig = inspect.signature(self.cls)
        skip = {"self", "params", "base_optimizer", "model", "foreach", "sync_perturbations", "base_kwargs"}
        out = {
            n: p.default
            for n, p in sig.parameters.items()
            if n not in skip and p.kind is inspect.Parameter.KEYWORD_ONLY
        }
        out.update(self.preset)
        return out


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    if spec.name in _REGISTRY:
        raise ValueError(f"method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = MethodSpec(**{**spec.__dict__, "preset": MappingProxyType(dict(spec.preset))})
    return _REGISTRY[spec.name]


def list_methods() -> list[str]:
    """Names accepted by :func:`create`, in registration order."""
    return list(_REGISTRY)


def get_method(name: str) -> MethodSpec:
    if not isinstance(name, str):
        raise TypeError(f"method name must be a str, got {type(name).__name__}")
    try:
        return _REGISTRY[name.lower()]
    except KeyError:
        raise ValueError(f"Unknown method {name!r}; known methods: {', '.join(_REGISTRY)}") from None


def create(
    name: str,
    params: Iterable[Tensor] | Iterable[dict[str, Any]],
    base_optimizer: type[Optimizer] | Optimizer,
    **kwargs: Any,
) -> SharpnessAware:
    """Build a registered method: ``create("asam", model.parameters(), torch.optim.SGD, lr=0.1)``.

    ``kwargs`` are the method's hyperparameters and the base optimizer's
    arguments; they override the method's preset.
    """
    spec = get_method(name)
    return spec.cls(params, base_optimizer, **{**spec.preset, **kwargs})


register(
    MethodSpec(
        "sam",
        SAM,
        "Sharpness-Aware Minimization: eps = rho g/||g||",
        "Foret et al., ICLR 2021, arXiv:2010.01412",
        doc="docs/methods/sam.md",
    )
)
register(
    MethodSpec(
        "asam",
        SAM,
        "Adaptive SAM: eps = rho T^2 g/||T g||, T = |w| + eta",
        "Kwon et al., ICML 2021, arXiv:2102.11600",
        preset={"adaptive": True, "rho": 0.5},
        doc="docs/methods/asam.md",
    )
)
register(
    MethodSpec(
        "gcsam",
        SAM,
        "Gradient-centralised SAM: eps = rho GC(g)/||GC(g)||",
        "Hassan et al., arXiv:2501.11584",
        preset={"centralize": True},
        doc="docs/methods/gcsam.md",
    )
)
register(
    MethodSpec(
        "wsam",
        WSAM,
        "Weighted SAM: L + gamma/(1-gamma) * sharpness; decoupled sharpness step by default",
        "Yue et al., KDD 2023, arXiv:2305.15817",
        extra_copies=2,
        doc="docs/methods/wsam.md",
    )
)
register(
    MethodSpec(
        "gsam",
        GSAM,
        "Surrogate-gap guided SAM: d = g_p - alpha g_perp, rho following the lr schedule",
        "Zhuang et al., ICLR 2022, arXiv:2203.08065",
        extra_copies=2,
        doc="docs/methods/gsam.md",
    )
)
register(
    MethodSpec(
        "fisher_sam",
        FisherSAM,
        "Fisher SAM: eps = rho F^-1 g / sqrt(g^T F^-1 g), F = diag(1 + eta g^2)",
        "Kim et al., ICML 2022, arXiv:2206.04920",
        doc="docs/methods/fisher_sam.md",
    )
)
register(
    MethodSpec(
        "friendly_sam",
        FriendlySAM,
        "FriendlySAM: eps along g - sigma m, m an EMA of past gradients",
        "Li et al., CVPR 2024, arXiv:2403.12350",
        extra_copies=3,
        doc="docs/methods/friendly_sam.md",
    )
)
register(
    MethodSpec(
        "vasso",
        VaSSO,
        "Variance-suppressed SAM: eps along an EMA d of the gradients",
        "Li & Giannakis, NeurIPS 2023, arXiv:2309.15639",
        extra_copies=3,
        doc="docs/methods/vasso.md",
    )
)
register(
    MethodSpec(
        "looksam",
        LookSAM,
        "LookSAM: SAM every k steps; in between g + alpha ||g||/||g_v|| g_v, g_v the part of the last g_s orthogonal to g",
        "Liu et al., CVPR 2022, arXiv:2203.02714",
        passes_per_step=1.2,  # 1 + 1/k at the default k = 5
        extra_copies=3,  # g_v (kept), saved w, clean g
        doc="docs/methods/looksam.md",
    )
)
register(
    MethodSpec(
        "esam",
        ESAM,
        "Efficient SAM: perturb a random subset of tensors (beta), descend on the gamma|B| sharpest samples",
        "Du et al., ICLR 2022, arXiv:2110.03141",
        # closure calls with the per-sample closure at gamma < 1: clean F+B (masked
        # backward), no-grad F, F+B on gamma|B| -- about 1 + 1/3 + gamma full passes
        passes_per_step=3.0,
        doc="docs/methods/esam.md",
        closure="per_sample",
    )
)
register(
    MethodSpec(
        "sam_every_k",
        SAMEveryK,
        "SAM every k steps, the base optimizer on g in between",
        "Liu et al., CVPR 2022, arXiv:2203.02714 (LookSAM's alpha = 0 baseline)",
        passes_per_step=1.2,  # 1 + 1/k at the default k = 5
        doc="docs/methods/sam_every_k.md",
    )
)
register(
    MethodSpec(
        "ae_sam",
        AESAM,
        "Adaptive policy: SAM when ||g||^2 >= mu + c sigma (EMAs), c steered to a target fraction r of SAM steps",
        "Jiang et al., ICLR 2023, arXiv:2304.14647",
        passes_per_step=1.5,  # 1 + r at the default r = 0.5
        doc="docs/methods/ae_sam.md",
    )
)
register(
    MethodSpec(
        "momentum_sam",
        MomentumSAM,
        "Momentum-SAM: eps = -rho m/||m|| from the base optimizer's momentum m, one pass per step",
        "Becker et al., arXiv:2401.12033",
        passes_per_step=1.0,
        doc="docs/methods/momentum_sam.md",
    )
)
