"""Progress display on stderr: rich progress bars with the live loss and
accuracy on a terminal, plain lines otherwise (logs, pipes, CI)."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, TextIO

from .train import RunResult

if TYPE_CHECKING:  # rich is optional (the cli extra); it is imported where used
    from rich.console import RenderableType
    from rich.progress import TaskID

PROGRESS_MODES = ("auto", "rich", "plain", "none")


def run_line(result: RunResult) -> str:
    f = result.final
    parts = [f"test acc {f['test_acc']:.1f}%", f"test loss {f['test_loss']:.3f}",
             f"train acc (clean) {f['train_clean_acc']:.1f}%"]
    if f.get("memorised") is not None:
        parts.append(f"memorised {f['memorised']:.1f}%")
    tail = f"{f['train_seconds']:.1f} s, {f['steps_per_sec']:.0f} steps/s"
    return f"{result.label} seed {result.seed}: " + ", ".join(parts) + f"  ({tail})"


def epoch_line(row: Mapping[str, Any], epochs: int) -> str:
    mem = f"  memorised {row['memorised']:5.1f}%" if row.get("memorised") is not None else ""
    return (f"epoch {row['epoch']:>3}/{epochs}  lr {row['lr']:.4f}  train loss {row['train_loss']:.4f}  "
            f"train acc {row['train_acc']:5.1f}%  test loss {row['test_loss']:.4f}  test acc {row['test_acc']:5.1f}%  "
            f"clean-train acc {row['train_clean_acc']:5.1f}%{mem}  ({row['steps_per_sec']:.0f} steps/s)")


class NullReporter:
    """Shows nothing."""

    def begin(self, runs: int, epochs: int) -> None:
        self.runs, self.epochs, self.index = runs, epochs, 0

    def run_start(self, result: RunResult, steps_per_epoch: int, start_epoch: int) -> None:
        self.index = getattr(self, "index", 0) + 1

    def step(self, epoch: int, step: int, loss: float, acc: float) -> None:
        pass

    def epoch_end(self, row: Mapping[str, Any]) -> None:
        pass

    def run_end(self, result: RunResult) -> None:
        pass

    def skip(self, result: RunResult) -> None:
        """A run already finished in an earlier session (``--resume``)."""
        self.index = getattr(self, "index", 0) + 1

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class PlainReporter(NullReporter):
    """A line per finished run (and per epoch with ``epoch_lines``)."""

    def __init__(self, file: TextIO | None = None, epoch_lines: bool = False) -> None:
        self.file = file or sys.stderr
        self.epoch_lines = epoch_lines
        self.runs, self.epochs, self.index = 1, 0, 0

    def _print(self, text: str) -> None:
        print(text, file=self.file, flush=True)

    def run_start(self, result: RunResult, steps_per_epoch: int, start_epoch: int) -> None:
        super().run_start(result, steps_per_epoch, start_epoch)
        self.current = result
        if start_epoch:
            self._print(f"[{self.index}/{self.runs}] {result.label} seed {result.seed}: resuming after epoch {start_epoch}")

    def epoch_end(self, row: Mapping[str, Any]) -> None:
        if self.epoch_lines:
            self._print(epoch_line(row, self.current.epochs))

    def run_end(self, result: RunResult) -> None:
        self._print(f"[{self.index}/{self.runs}] " + run_line(result))

    def skip(self, result: RunResult) -> None:
        super().skip(result)
        self._print(f"[{self.index}/{self.runs}] {run_line(result)}  [finished earlier]")

    def message(self, text: str) -> None:
        self._print(text)


class RichReporter(NullReporter):
    """Two bars: the whole comparison (in epochs) and the current run (in
    steps, with the running loss/accuracy and the last test accuracy)."""

    def __init__(self, epoch_lines: bool = False, file: TextIO | None = None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
        from rich.text import Text

        class _Progress(Progress):  # the bars, then one line of live numbers under them
            info = ""

            def get_renderables(self) -> Iterable[RenderableType]:
                yield self.make_tasks_table(self.tasks)
                if self.info:
                    yield Text(self.info, overflow="ellipsis", no_wrap=True)

        self.console = Console(file=file or sys.stderr)
        self.progress = _Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.epoch_lines = epoch_lines
        self.runs, self.epochs, self.index = 1, 0, 0
        self.overall: TaskID | None = None
        self.task: TaskID | None = None
        self.last_test = ""
        self.closed = False
        self.progress.start()

    def begin(self, runs: int, epochs: int) -> None:
        self.runs, self.epochs, self.index = runs, epochs, 0
        self.overall = self.progress.add_task("all runs (epochs)", total=runs * epochs)

    def run_start(self, result: RunResult, steps_per_epoch: int, start_epoch: int) -> None:
        super().run_start(result, steps_per_epoch, start_epoch)
        self.current, self.steps_per_epoch, self.epoch = result, steps_per_epoch, start_epoch + 1
        self.last_test = ""
        if self.task is not None:
            self.progress.remove_task(self.task)
        self.task = self.progress.add_task(
            f"[{self.index}/{self.runs}] {result.label} seed {result.seed} (steps)",
            total=steps_per_epoch * result.epochs, completed=steps_per_epoch * start_epoch,
        )
        self.progress.info = ""
        if self.overall is not None and start_epoch:
            self.progress.advance(self.overall, start_epoch)

    def step(self, epoch: int, step: int, loss: float, acc: float) -> None:
        done = (epoch - 1) * self.steps_per_epoch + step
        self.progress.info = f"epoch {epoch}/{self.current.epochs}  train loss {loss:.3f}  train acc {acc:.1f}%{self.last_test}"
        assert self.task is not None, "step() before run_start()"
        self.progress.update(self.task, completed=done)

    def epoch_end(self, row: Mapping[str, Any]) -> None:
        self.last_test = f"  | last epoch: test acc {row['test_acc']:.1f}%, test loss {row['test_loss']:.3f}"
        if self.overall is not None:
            self.progress.advance(self.overall, 1)
        if self.epoch_lines:
            self.progress.console.print(epoch_line(row, self.current.epochs), highlight=False)

    def run_end(self, result: RunResult) -> None:
        self.progress.console.print(f"[{self.index}/{self.runs}] " + run_line(result), highlight=False)

    def skip(self, result: RunResult) -> None:
        super().skip(result)
        if self.overall is not None:
            self.progress.advance(self.overall, result.epochs)
        self.progress.console.print(f"[{self.index}/{self.runs}] {run_line(result)}  [finished earlier]", highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, highlight=False)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.progress.stop()


def make_reporter(mode: str = "auto", *, epoch_lines: bool = False, file: TextIO | None = None) -> NullReporter:
    """``auto``: rich bars when stderr is a terminal and rich is installed, else plain lines."""
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress mode must be one of {PROGRESS_MODES}, got {mode!r}")
    if mode == "none":
        return NullReporter()
    stream = file or sys.stderr
    if mode == "auto":
        mode = "rich" if hasattr(stream, "isatty") and stream.isatty() else "plain"
    if mode == "rich":
        try:
            return RichReporter(epoch_lines=epoch_lines, file=stream)
        except ImportError:
            pass
    return PlainReporter(stream, epoch_lines=epoch_lines)
