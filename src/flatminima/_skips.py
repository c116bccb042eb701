"""What a user hears about skipped steps.

A step with a non-finite value in either pass is skipped whole. The first
skip warns once; after that skips are only counted (``opt.skipped_steps``),
unless they become the rule: once at least 10 steps have been tried and
more than half of the last 100 were skipped, a second warning says how many
and names the likely causes with their values (a radius so large that
``w + eps`` overflows, a learning rate that diverges, non-finite data). It
warns again only after another 100 steps.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable
from typing import Any

WINDOW = 100  # steps the rate is taken over
MIN_STEPS = 10  # steps tried before the rate means anything


class SkipLog:
    """The skips of one optimizer (not saved: a resumed run starts afresh)."""

    def __init__(self, owner: str, groups: Callable[[], list[dict[str, Any]]]) -> None:
        self.owner, self.groups = owner, groups
        self.warned = False
        self.recent: deque[bool] = deque(maxlen=WINDOW)
        self.count = 0  # skips in ``recent``, kept as it moves (no sum over the window each step)
        self.quiet = 0  # steps left before the rate may warn again

    def skipped(self, where: str) -> None:
        """A step skipped for a non-finite value in the ``where`` pass."""
        if not self.warned:
            self.warned = True
            msg = f"{self.owner}: non-finite gradient in the {where} pass; the step was skipped (weights and "
            msg += "optimizer state unchanged). Later skips are counted in .skipped_steps without a warning."
            warnings.warn(msg, RuntimeWarning, stacklevel=4)
        self._record(True)

    def taken(self) -> None:
        self._record(False)

    def _record(self, skipped: bool) -> None:
        if len(self.recent) == WINDOW:
            self.count -= self.recent[0]  # about to fall out of the window
        self.recent.append(skipped)
        self.count += skipped
        self.quiet = max(self.quiet - 1, 0)
        n, k = len(self.recent), self.count
        if n >= MIN_STEPS and 2 * k > n and not self.quiet:
            self.quiet = WINDOW
            rhos = sorted({g.get("rho") for g in self.groups()}, key=str)
            lrs = sorted({g.get("lr") for g in self.groups()}, key=str)
            warnings.warn(
                f"{self.owner}: {k} of the last {n} steps were skipped for non-finite values, so training has "
                f"mostly stopped. Likely causes: a radius so large that w + eps overflows (rho = {rhos}), a "
                f"learning rate that makes the weights diverge (lr = {lrs}), or non-finite data (inputs, labels "
                "or the loss); check them, or lower rho and lr",
                RuntimeWarning,
                stacklevel=4,
            )
