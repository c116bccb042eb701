"""The three axes a method is built from, and the checks on their products.

A sharpness-aware method is one *ascent* chain, one *combine* and one
*schedule* (docs/composition.md):

* ascent — how ``eps`` comes from the clean gradient ``g``: each part maps
  the vector ``v`` in place (``vector``), the protocol takes the global
  norm, each part finishes its share (``finish``, in reverse order) and
  may change the radius (``radius``). A *pre-pass* ascent (Momentum-SAM)
  builds ``v`` from optimizer state before any pass (``prepare``);
* combine — how ``g`` and ``g_p`` become the direction handed to the base
  optimizer (``combine``; ``combine_unperturbed`` on steps without a
  perturbed pass) and what is added after the base step (``post_step``);
* schedule — whether this step runs the perturbed pass (``decide``).

Parts hold no training state: what a method remembers lives in the
optimizer (``opt.state[p]``, ``opt.method_state``), so state dicts stay
one flat record. Every hook takes the optimizer and the step's context.
Hooks that run before the perturbed pass must not change persistent state
(a non-finite ``g_p`` skips the step): commit in ``post_step``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar

from torch import Tensor

from ._context import GroupView, StepContext
from ._options import Option

if TYPE_CHECKING:
    from ._base import SharpnessAware


#: every named part, by axis and name: what ``compose()`` knows (a part
#: class registers itself when its module is imported)
PARTS: dict[str, dict[str, type[Part]]] = {"ascent": {}, "combine": {}, "schedule": {}}


class Part:
    """What every part may declare and override (all optional)."""

    axis: ClassVar[str] = ""
    #: the name ``compose()`` knows it by
    name: ClassVar[str] = ""
    #: the part's own options (per group unless ``Option.wide``)
    options: ClassVar[Mapping[str, Option]] = {}
    #: shared options it reads (``_options.SHARED`` keys)
    shared: ClassVar[tuple[str, ...]] = ()
    #: needs the clean gradient after the perturbed pass (one more copy during the step)
    needs_clean_grad: ClassVar[bool] = False
    #: reads the clean gradient before the perturbation exists (not after a pre-pass ascent)
    reads_gradient: ClassVar[bool] = False
    #: keys of ``ctx.extra`` holding ``{param: Tensor}`` from a shard's own gradient (averaged over shards)
    shard_state: ClassVar[tuple[str, ...]] = ()
    #: keys of ``opt.state[p]`` the part keeps between steps, each a tensor like ``p``'s gradient
    #: (distributed checkpoints hold a placeholder for each until it exists: flatminima.distributed)
    param_state: ClassVar[tuple[str, ...]] = ()
    #: keeps ``method_state["step"]``, the steps taken (one counter, however many parts use it)
    counts_steps: ClassVar[bool] = False
    #: a feature of the step the part brings along: a class mixed into the optimizer's (ESAM's data selection)
    feature: ClassVar[type | None] = None

    def product_defaults(self, combine: str, schedule: str) -> dict[str, Any]:
        """Option defaults of a composed product with this part that differ from the part's own."""
        return {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name and cls.axis:
            known = PARTS[cls.axis].get(cls.name)
            if known is not None and known.__qualname__ != cls.__qualname__:
                raise ValueError(f"{cls.axis} {cls.name!r} is already the part {known.__qualname__}")
            PARTS[cls.axis][cls.name] = cls

    def init(self, opt: SharpnessAware) -> None:
        """Set up ``opt.method_state`` at construction."""

    def check_group(self, group: Mapping[str, Any]) -> None:
        """Checks across the options of one group (each option is checked alone already)."""

    def needs_whole_tensors(self, opt: SharpnessAware, group: Mapping[str, Any]) -> str | None:
        """Why this part needs whole parameter tensors in ``group`` (it refuses FSDP1's flattened
        shards then: docs/distributed.md), or None."""
        return None

    def post_step(self, opt: SharpnessAware, ctx: StepContext) -> None:
        """After the base step: extra update terms and commits of state."""


class Ascent(Part):
    axis = "ascent"
    #: knows ``v`` before the clean pass (from optimizer state): one pass per step
    pre_pass: ClassVar[bool] = False

    def needs_scratch(self, view: GroupView) -> bool:
        """Whether this part uses a parameter-sized scratch buffer in this group."""
        return False

    def radius(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, radius: Any) -> Any:
        return radius

    def vector(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> bool:
        """Map ``v`` (``view.grads``) in place; True when it changed ``v``."""
        return False

    def finish(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, scratch: list[Tensor]) -> None:
        """Map the normalised ``v`` to this part's share of the direction of ``eps``."""

    def prepare(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        """Pre-pass ascents: fill ``ctx.groups`` with ``v`` from state; False: no perturbation."""
        return False


class Combine(Part):
    axis = "combine"

    def wants(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        """False vetoes the perturbed pass (the step would not use it)."""
        return True

    def radius(self, opt: SharpnessAware, ctx: StepContext, view: GroupView, radius: Any) -> Any:
        return radius

    def combine(self, opt: SharpnessAware, ctx: StepContext) -> None:
        """Write the direction into ``view.grads`` (``g_p`` on entry)."""

    def combine_unperturbed(self, opt: SharpnessAware, ctx: StepContext) -> None:
        """The direction of a step without a perturbed pass (``g`` on entry)."""


class Schedule(Part):
    axis = "schedule"

    def decide(self, opt: SharpnessAware, ctx: StepContext) -> bool:
        """Whether this step runs the perturbed pass."""
        return True


class Plain(Ascent):
    """``v = g``: SAM's ascent (the chain's identity)."""

    name = "sam"


class Always(Schedule):
    """A perturbed pass at every step."""

    name = "always"


class Descend(Combine):
    """``d = g_p``: SAM's combine."""

    name = "sam"


def check_product(ascent: Sequence[Ascent], combine: Combine, schedule: Schedule) -> None:
    """Raise a ValueError naming both parts for a product that cannot work."""
    parts: list[Part] = [*ascent, combine, schedule]
    names = [a.name for a in ascent]
    if not ascent or len(set(names)) != len(names):
        raise ValueError(f"an ascent chain names each part once, and at least one: got {names}")
    for i, a in enumerate(ascent):
        if a.pre_pass and i != 0:
            raise ValueError(
                f"ascent {a.name!r} builds eps before the clean pass: put it first in the chain, before {names[0]!r}"
            )
    if ascent and ascent[0].pre_pass:
        first = ascent[0]
        for other in parts[1:]:
            if other.needs_clean_grad or other.reads_gradient:
                raise ValueError(
                    f"{first.name!r} ascent and {other.name!r} {other.axis}: a {first.name} step has no clean "
                    f"gradient at w (one pass, at w + eps), and {other.name} needs one"
                )
    owners: dict[str, Part] = {}
    for part in parts:
        for key in part.options:
            if key in owners and owners[key] is not part:
                _collision(owners[key], part, key)
            owners[key] = part
    for part in parts:
        for key in part.shared:
            if key in owners and owners[key] is not part:
                _collision(owners[key], part, key)


def _collision(a: Part, b: Part, key: str) -> None:
    raise ValueError(
        f"{a.name!r} {a.axis} and {b.name!r} {b.axis} both use the option {key!r} with different "
        "meanings; they cannot be combined"
    )

