"""Progress reporting for the long measures, with no hard dependency.

Every long measure takes ``progress``:

* ``None`` or ``False`` (default): silent;
* a callable ``progress(done, total, message)``: called after each unit of
  work (a Hessian-vector product, a landscape point, ...); ``total`` is the
  most units the measure may take (an iterative measure can stop early);
* ``True``: a bar from ``tqdm`` when it is installed, else from ``rich``,
  else one line on stderr about every 10%.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, Union

ProgressCallback = Callable[[int, int, str], None]
ProgressLike = Union[bool, ProgressCallback, None]


class Reporter:
    """A handle that the measures update; see the module docstring."""

    def __init__(self, progress: ProgressLike, total: int, desc: str) -> None:
        if progress is not None and not isinstance(progress, bool) and not callable(progress):
            raise TypeError(f"progress must be None, a bool or a callable (done, total, message), got {type(progress).__name__}")
        self.total, self.desc, self.done = max(int(total), 0), desc, 0
        self._callback: ProgressCallback | None = progress if callable(progress) and not isinstance(progress, bool) else None
        self._bar: Any = None
        self._rich: Any = None
        self._task: Any = None
        self._last_line = -1
        if progress is True:
            self._open_bar()

    def _open_bar(self) -> None:
        try:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=self.total, desc=self.desc, leave=False)
            return
        except ImportError:
            pass
        try:
            from rich.progress import Progress  # type: ignore[import-not-found]

            self._rich = Progress(transient=True)
            self._rich.start()
            self._task = self._rich.add_task(self.desc, total=self.total)
        except ImportError:
            self._t0 = time.perf_counter()

    def update(self, n: int = 1, message: str = "") -> None:
        self.done += n
        if self._callback is not None:
            self._callback(self.done, self.total, message or self.desc)
        elif self._bar is not None:
            self._bar.update(n)
            if message:
                self._bar.set_postfix_str(message, refresh=False)
        elif self._rich is not None:
            self._rich.update(self._task, advance=n, description=f"{self.desc} {message}".strip())
        elif hasattr(self, "_t0"):
            tenth = (10 * self.done) // max(self.total, 1)
            if tenth != self._last_line:
                self._last_line = tenth
                elapsed = time.perf_counter() - self._t0
                print(f"[{self.desc}] {self.done}/{self.total} {message} ({elapsed:.1f} s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._rich is not None:
            self._rich.stop()
            self._rich = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
