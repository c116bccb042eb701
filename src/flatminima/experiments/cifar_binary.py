"""CIFAR's official *binary* version, read with no pickle at all.

Each file is a run of fixed-size records: the label byte(s), then the
3072 pixel bytes (1024 red, 1024 green, 1024 blue, row-major 32x32), so
``np.frombuffer`` reads it as it is. CIFAR-10 records carry one label byte;
CIFAR-100 records carry two, the coarse (20 superclasses) then the fine (100
classes) label, and the fine one is the label trained on, as in the python
version. Class names come from the text files next to the batches, one name
a line.

:mod:`.data` picks this layout when a folder holds these files and not the
python pickles.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import DataError

PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class BinaryLayout:
    folder: str  # the sub-folder the archive extracts to
    archive: str
    train: tuple[str, ...]
    test: tuple[str, ...]
    names: str  # the class names, one a line
    label_bytes: int  # per record, before the pixels; the last one is the label trained on

    @property
    def files(self) -> list[str]:
        return [*self.train, *self.test, self.names]


LAYOUTS = {
    "cifar10": BinaryLayout("cifar-10-batches-bin", "cifar-10-binary.tar.gz",
                            tuple(f"data_batch_{i}.bin" for i in range(1, 6)), ("test_batch.bin",),
                            "batches.meta.txt", label_bytes=1),
    "cifar100": BinaryLayout("cifar-100-binary", "cifar-100-binary.tar.gz", ("train.bin",), ("test.bin",),
                             "fine_label_names.txt", label_bytes=2),
}


def read_part(path: Path, layout: BinaryLayout, classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 3, 32, 32)`` uint8 and labels ``(N,)`` int64 of one binary batch."""
    record = layout.label_bytes + PIXELS
    try:
        raw = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if raw.size == 0 or raw.size % record:
        raise DataError(f"{path}: not a CIFAR binary batch: {raw.size} bytes is not a positive multiple of the "
                        f"record size {record} ({layout.label_bytes} label byte(s) + {PIXELS} pixels)")
    rows = raw.reshape(-1, record)
    y = rows[:, layout.label_bytes - 1].astype(np.int64)
    if y.max() >= classes:
        raise DataError(f"{path}: labels must lie in [0, {classes - 1}], found {y.min()}..{y.max()}")
    return rows[:, layout.label_bytes:].reshape(-1, 3, 32, 32), y


def read_names(path: Path, classes: int) -> tuple[str, ...] | None:
    """The class names of the text file, or None when it does not hold ``classes`` of them."""
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError as e:
        raise DataError(f"cannot read {path}: {e}") from None
    names = [n for n in names if n]  # the official files end with blank lines
    return tuple(names) if len(names) == classes else None
