"""Options: declared once, validated once, documented once.

Every method takes the *shared* options below; a method (or one of its
parts) declares only its own. An option is per group (a key of every param
group, so LR schedulers and ``add_param_group`` see it, and each group may
set its own value) unless it is ``wide``: one value for the whole optimizer,
kept as an attribute and saved in the state dict.

The Args text of the shared options is written here once and spliced into
each method's docstring where it says ``@shared_args@``.
"""

from __future__ import annotations

import re
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import _validate as V


@dataclass(frozen=True)
class Option:
    """One hyperparameter: its default, its check and one line of doc."""

    default: Any
    check: Callable[[str, Any], Any]
    doc: str
    wide: bool = False  # one value per optimizer (an attribute) instead of per group
    saved: bool = True  # wide only: travels in the state dict's "options"


#: per-group options every neighbourhood reads (``adaptive``/``eta`` and
#: ``centralize`` only where the method's ascent has those parts)
SHARED: dict[str, Option] = {
    "rho": Option(0.05, V.non_negative, "neighbourhood radius"),
    "adaptive": Option(False, V.flag, "use ASAM's operator ``T_w = |w| + eta`` for ``eps``"),
    "eta": Option(0.01, V.non_negative, "ASAM's offset (``eta=0``: the eta-free form)"),
    "centralize": Option(False, V.flag, "centralise the ascent vector (GCSAM)"),
    "norm_eps": Option(1e-12, V.positive, "denominator offset ``eps0`` of the radius"),
}

#: options of the protocol itself, taken by every method (wide)
PROTOCOL: dict[str, Option] = {
    "max_grad_norm": Option(
        None, V.optional_positive, "clip the direction handed to the base optimizer to this global norm", wide=True
    ),
    "foreach": Option(None, V.optional_flag, "multi-tensor kernels (None: on where supported)", wide=True, saved=False),
    "model": Option(
        None,
        lambda name, value: value,  # type-checked in SharpnessAware.__init__
        "the module: ``step(closure)`` then keeps BatchNorm running statistics from the perturbed pass; "
        "under DDP give the ``DistributedDataParallel`` module, under Lightning's DDP the LightningModule "
        "(one ``eps`` per replica)",
        wide=True,
        saved=False,
    ),
    "sync_perturbations": Option(
        False, V.flag, "under DDP, average the clean gradient too: one global ``eps`` (docs/training.md)", wide=True
    ),
}

_HEAD = """\
params: parameters or param-group dicts (per-group options allowed).
base_optimizer: a ``torch.optim.Optimizer`` class, built over our param
    groups with ``**base_kwargs``, or an instance built over the same parameters."""

_TAIL = "**base_kwargs: the base optimizer's arguments (``lr``, ``momentum``, ...)."


def args_text(options: Mapping[str, Option]) -> str:
    """The Args lines of ``options`` (name: doc (default ...))."""
    lines = [_HEAD]
    for name, opt in options.items():
        line = f"{name}: {opt.doc} (default {opt.default!r})."
        lines.append(textwrap.fill(line, 76, subsequent_indent="    "))
    lines.append(_TAIL)
    return "\n".join(lines)


def splice(doc: str | None, options: Mapping[str, Option]) -> str | None:
    """Put the Args text of ``options`` where ``doc`` says ``@shared_args@``
    (indented as that line is)."""
    if not doc or "@shared_args@" not in doc:
        return doc
    documented = set(re.findall(r"^\s+(\w+): ", doc, flags=re.M))
    options = {name: opt for name, opt in options.items() if name not in documented}
    out = []
    for line in doc.splitlines():
        if line.strip() == "@shared_args@":
            indent = line[: len(line) - len(line.lstrip())]
            out.append(textwrap.indent(args_text(options), indent))
        else:
            out.append(line)
    return "\n".join(out)
