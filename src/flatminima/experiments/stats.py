"""Confidence intervals over seeds, for the study's tables.

``t_interval(values)`` is the mean with the half-width of its two-sided
Student-t interval, ``t_{1-(1-level)/2, n-1} * s / sqrt(n)`` (``s`` the
sample standard deviation). ``paired_difference(a, b)`` is the same
interval for the per-seed differences ``a[seed] - b[seed]`` over the seeds
both have: pairing on the seed removes what the two runs of a seed share
(initial weights, data order, the noisy labels), so the interval is the one
of the method's effect, narrower than the difference of two intervals.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """``mean ± half`` over ``n`` values (``half`` is NaN for one value)."""

    mean: float
    half: float
    n: int

    @property
    def low(self) -> float:
        return self.mean - self.half

    @property
    def high(self) -> float:
        return self.mean + self.half

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly on one side of 0 (a difference that is resolved)."""
        return math.isfinite(self.half) and (self.low > 0 or self.high < 0)


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy,
    which comes with scikit-learn in the ``cli`` extra)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def t_interval(values: Sequence[float], level: float = 0.95) -> Interval:
    """Mean and Student-t half-width of ``values``; non-finite values are refused.

    >>> i = t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    >>> round(i.mean, 6), round(i.half, 4)  # 2.776445 * sqrt(2.5) / sqrt(5)
    (3.0, 1.9632)
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("a confidence interval needs at least one value, got none")
    bad = [v for v in vals if not math.isfinite(v)]
    if bad:
        raise ValueError(f"a confidence interval needs finite values, got {bad[0]!r} among {vals}")
    n = len(vals)
    if n == 1:
        return Interval(vals[0], math.nan, 1)
    half = t_quantile(1.0 - (1.0 - level) / 2.0, n - 1) * statistics.stdev(vals) / math.sqrt(n)
    return Interval(statistics.fmean(vals), half, n)


def paired_difference(a: Mapping[int, float], b: Mapping[int, float], level: float = 0.95) -> Interval:
    """The interval of ``a[s] - b[s]`` over the seeds ``s`` in both mappings.

    >>> d = paired_difference({0: 60.0, 1: 62.0, 2: 61.0}, {0: 55.0, 1: 56.0, 2: 57.0})
    >>> d.mean, round(d.half, 4)  # differences 5, 6, 4: 4.302653 * 1 / sqrt(3)
    (5.0, 2.4841)
    """
    common = sorted(set(a) & set(b))
    if not common:
        raise ValueError(f"a paired difference needs seeds in both runs; got seeds {sorted(a)} and {sorted(b)}")
    return t_interval([a[s] - b[s] for s in common], level)
