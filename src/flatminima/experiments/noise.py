"""Label noise on the training labels (the test labels are never touched).

``corrupt_labels(labels, rate, kind, num_classes, seed)`` returns the noisy
labels and the mask of the corrupted examples. The rate is exact: every
chosen label is changed to a *different* class, so the share of wrong labels
is ``rate`` (rounded to whole examples), not ``rate * (K - 1) / K`` as with
the "replace by a uniformly drawn class" convention.

* ``symmetric``: ``round(rate * N)`` examples drawn uniformly from the whole
  set; each gets a uniformly drawn different class.
* ``asymmetric``: the standard class-to-similar-class noise. A data set
  has a fixed mapping :data:`ASYMMETRIC` of some classes to a similar one;
  in each mapped class ``c``, ``round(rate * N_c)`` of its examples get the
  class ``mapping[c]``, and the other classes stay clean (so the share of
  wrong labels over the whole set is ``rate`` times the mapped classes'
  share). The mappings:

  - ``digits`` (8x8 handwritten digits): the MNIST mapping of Patrini et al.
    2017 (and Han et al. 2018), 2 -> 7, 3 -> 8, 5 <-> 6, 7 -> 1.
  - ``mnist1d``: MNIST-1D's digits are 1-D templates that do not look like
    the handwritten ones, so the MNIST mapping does not carry over; the
    mapping is read from the confusion matrix of the MLP trained with SGD
    on clean MNIST-1D (10000 examples, seed 0, 40 epochs, 79% test
    accuracy): the five classes with the most test errors, each to the
    class it is most often predicted as, 1 -> 4 (49 of 212), 4 -> 1 (33 of
    193), 9 -> 4 (43 of 191), 2 -> 5 (20 of 211), 5 -> 1 (16 of 197).
  - ``cifar10``: Patrini et al. 2017, truck -> automobile (9 -> 1), bird ->
    airplane (2 -> 0), deer -> horse (4 -> 7), cat <-> dog (3 <-> 5).

  Other data sets have no mapping: use ``pairflip``.
* ``pairflip``: the generic class-dependent noise, in every class ``c``
  ``round(rate * N_c)`` of its examples get the class ``(c + 1) mod K``
  ("pair flipping", as used for CIFAR-100 by Han et al. 2018); any data set.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from .errors import ConfigError

NOISE_TYPES = ("symmetric", "asymmetric", "pairflip")

#: The class-to-similar-class mapping of ``asymmetric`` noise per data set (see the module docstring).
ASYMMETRIC: dict[str, dict[int, int]] = {
    "digits": {2: 7, 3: 8, 5: 6, 6: 5, 7: 1},
    "mnist1d": {1: 4, 4: 1, 9: 4, 2: 5, 5: 1},
    "cifar10": {9: 1, 2: 0, 4: 7, 3: 5, 5: 3},
}


def check_noise(rate: float, kind: str, dataset: str | None = None) -> None:
    """Refuse a noise setting that cannot be served; ``dataset`` (when known)
    must have an ``asymmetric`` mapping."""
    if kind not in NOISE_TYPES:
        raise ConfigError(f"--noise-type must be one of {', '.join(NOISE_TYPES)}, got {kind!r}")
    if kind == "asymmetric" and dataset is not None and dataset not in ASYMMETRIC:
        raise ConfigError(f"--noise-type asymmetric: data set {dataset!r} has no class-to-similar-class mapping "
                          f"(those with one: {', '.join(ASYMMETRIC)}); use --noise-type pairflip (class c -> c+1) "
                          "or symmetric")
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0.0 <= rate < 1.0:
        raise ConfigError(f"--noise (the share of corrupted training labels) must be in [0, 1), got {rate!r}")
    if kind != "symmetric" and rate > 0.5:
        raise ConfigError(
            f"--noise {rate} with {kind} noise: above 0.5 the flipped class outnumbers the true one "
            "and the labels no longer determine the class; use a rate <= 0.5"
        )


def corrupt_labels(
    labels: Tensor, rate: float, kind: str = "symmetric", num_classes: int | None = None, seed: int = 0,
    dataset: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Return ``(noisy_labels, corrupted_mask)``; ``labels`` is left as it was.
    ``asymmetric`` noise needs ``dataset``, the name that picks its mapping.

    >>> import torch
    >>> y = torch.arange(10) % 5
    >>> noisy, corrupted = corrupt_labels(y, 0.3, num_classes=5, seed=0)
    >>> int(corrupted.sum()), bool((noisy[corrupted] != y[corrupted]).all()), torch.equal(noisy[~corrupted], y[~corrupted])
    (3, True, True)
    """
    check_noise(rate, kind, dataset)
    if kind == "asymmetric" and dataset is None:
        raise ConfigError("asymmetric noise flips each class to a similar one, which depends on the data set: "
                          f"pass dataset= (one of {', '.join(ASYMMETRIC)}), or use kind='pairflip' (c -> c+1)")
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
        targets = {c: (c + 1) % k for c in range(k)} if kind == "pairflip" else ASYMMETRIC[str(dataset)]
        if max(max(targets), max(targets.values())) >= k:
            raise ConfigError(f"asymmetric noise of {dataset} maps classes up to {max(max(targets), max(targets.values()))}, "
                              f"but the labels have {k} classes")
        for c, target in targets.items():
            members = np.flatnonzero(y == c)
            idx = rng.permutation(members)[: int(round(rate * len(members)))]
            noisy[idx] = target
            mask[idx] = True
    return torch.from_numpy(noisy).to(labels.device), torch.from_numpy(mask).to(labels.device)
