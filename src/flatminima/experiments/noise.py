"""Label noise on the training labels (the test labels are never touched).

``corrupt_labels(labels, rate, kind, num_classes, seed)`` returns the noisy
labels and the mask of the corrupted examples. The rate is exact: every
chosen label is changed to a *different* class, so the share of wrong labels
is ``rate`` (rounded to whole examples), not ``rate * (K - 1) / K`` as with
the "replace by a uniformly drawn class" convention.

* ``symmetric``: ``round(rate * N)`` examples drawn uniformly from the whole
  set; each gets a uniformly drawn different class.
* ``asymmetric``: in every class ``c``, ``round(rate * N_c)`` of its examples
  get the class ``(c + 1) mod K`` (class-dependent, "pair flipping" noise,
  as used for CIFAR-100 by Han et al. 2018 and Patrini et al. 2017).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

NOISE_TYPES = ("symmetric", "asymmetric")


def check_noise(rate: float, kind: str) -> None:
    if kind not in NOISE_TYPES:
        raise ConfigError(f"--noise-type must be one of {', '.join(NOISE_TYPES)}, got {kind!r}")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"--noise (the share of corrupted training labels) must be in [0, 1), got {rate!r}")
    if kind == "asymmetric" and rate > 0.5:
        raise ConfigError(
            f"--noise {rate} with asymmetric noise: above 0.5 the flipped class outnumbers the true one "
            "and the labels no longer determine the class; use a rate <= 0.5"
        )


def corrupt_labels(
    labels: Tensor, rate: float, kind: str = "symmetric", num_classes: int | None = None, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Return ``(noisy_labels, corrupted_mask)``; ``labels`` is left as it was.

    >>> import torch
    >>> y = torch.arange(10) % 5
    >>> noisy, corrupted = corrupt_labels(y, 0.3, num_classes=5, seed=0)
    >>> int(corrupted.sum()), bool((noisy[corrupted] != y[corrupted]).all()), torch.equal(noisy[~corrupted], y[~corrupted])
    (3, True, True)
    """
    check_noise(rate, kind)
    y = labels.detach().cpu().numpy().astype(np.int64)
    k = int(num_classes if num_classes is not None else (y.max() + 1 if y.size else 0))
    if k < 2:
        raise ConfigError(f"label noise needs at least 2 classes, got {k}")
    rng = np.random.default_rng([int(seed), 0x6E6F69])  # independent of the other seeded streams
    noisy = y.copy()
    mask = np.zeros(len(y), dtype=bool)
    if kind == "symmetric":
        idx = rng.permutation(len(y))[: int(round(rate * len(y)))]
        noisy[idx] = (y[idx] + rng.integers(1, k, size=len(idx))) % k
        mask[idx] = True
    else:
        for c in range(k):
            members = np.flatnonzero(y == c)
            idx = rng.permutation(members)[: int(round(rate * len(members)))]
            noisy[idx] = (c + 1) % k
            mask[idx] = True
    return torch.from_numpy(noisy).to(labels.device), torch.from_numpy(mask).to(labels.device)
