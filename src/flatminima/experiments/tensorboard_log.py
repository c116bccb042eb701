"""``--log tensorboard``: a comparison's metrics and figures as TensorBoard runs.

:class:`TensorBoardLog` is a ``compare``/``train_run`` callback (see
:data:`~.train.Callback`) writing, with ``torch.utils.tensorboard``:

* ``<folder>/<run>/``, one TensorBoard run per method and seed (``<run>`` is
  the run's file-name stem, ``01_sam_seed0``): every number of every epoch's
  row (``test_acc``, ``train_loss``, ``lr``, ...) at step = epoch, and the
  final extras (``--sharpness``: ``final/lambda_max``, ``final/trace``) at
  step = the last epoch;
* ``<folder>/figures/``: the PNG figures of the results folder (``curves``,
  ``final_accuracy``, ``landscape``) as images, by :meth:`TensorBoardLog.add_figures`.

``tensorboard --logdir <folder>`` shows them. Needs the ``tensorboard`` extra.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import ConfigError, write_error
from .runner import label_slug

#: Keys of an event that name it rather than measure it.
_NOT_METRICS = frozenset({"event", "label", "method", "seed", "run", "epoch"})
EXTRA = "tensorboard"


def _summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch's module raises ImportError when the tensorboard package is missing
        raise ConfigError(f"--log tensorboard needs the '{EXTRA}' extra, and tensorboard is not installed: "
                          f"pip install 'flatminima[{EXTRA}]'") from None
    return SummaryWriter


class TensorBoardLog:
    """The callback of ``--log tensorboard``, writing under ``folder``; call
    :meth:`close` at the end (or use it as a context manager)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self._writer_class = _summary_writer()  # fails first, before any run starts
        self.folder = Path(folder)
        self._writers: dict[str, Any] = {}

    def _writer(self, run: str) -> Any:
        if run not in self._writers:
            try:
                self._writers[run] = self._writer_class(log_dir=str(self.folder / run))
            except OSError as e:
                raise write_error(e, self.folder / run) from None
        return self._writers[run]

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event["event"]
        if kind not in ("epoch", "end"):
            return  # steps: too many points for a run's overview; Python callers take them from the callback
        run = event.get("run") or f"{label_slug(event['label'])}_seed{event['seed']}"  # train_run's own events
        writer = self._writer(run)
        if kind == "epoch":
            values, step = {k: v for k, v in event.items() if k not in _NOT_METRICS}, event["epoch"]
        else:
            values, step = {f"final/{k}": v for k, v in event["extras"].items()}, event["epochs"]
        for tag, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                writer.add_scalar(tag, value, global_step=step)
        writer.flush()  # visible to a running TensorBoard at once

    def add_figures(self, paths: Iterable[str | os.PathLike[str]]) -> list[str]:
        """Add the PNG files among ``paths`` that exist as images of the
        ``figures`` run (tag: the file's stem); returns the tags written."""
        from matplotlib.image import imread

        tags = []
        for path in map(Path, paths):
            if path.is_file():
                image = imread(path)  # H x W x 4 floats in [0, 1]
                self._writer("figures").add_image(path.stem, image[..., :3], global_step=0, dataformats="HWC")
                tags.append(path.stem)
        if tags:
            self._writers["figures"].flush()
        return tags

    def close(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()

    def __enter__(self) -> TensorBoardLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
