"""One run at a time in a results folder.

Two runs writing the same ``--out`` would overwrite each other's results, so
:func:`locked_out` (around :func:`~flatminima.experiments.runner.compare`)
creates ``<out>/.flatminima.lock`` with ``O_CREAT | O_EXCL`` (the create
fails when the file exists, atomically, also between processes) holding the
owner's pid, its process start time, its host name and the wall-clock time.
A second run finds the file and is refused with one line naming the owner.

A lock whose owner is gone is *stale* and is taken over: on Linux the owner
is gone when ``/proc/<pid>/stat`` is missing or shows another start time
(field 22, clock ticks since boot: a reused pid is not taken for the old
run). Elsewhere (macOS, BSD) there is no start time to compare: a live pid
counts as the owner (``kill(pid, 0)``), and on Windows, where no probe is
safe (``os.kill`` terminates), so does any pid. A lock written on another
host, or one that cannot be read, is never taken over. In these cases the
error names the file to delete by hand once no run uses the folder.

Under ``torchrun`` rank 0 alone takes the lock and tells the other ranks
whether it got it. The lock is removed when ``compare`` returns or raises
(Ctrl-C included), and only if it is still this run's.

Holding the lock also makes it safe to remove what an interrupted write left
behind: :func:`~flatminima.experiments.checkpoint.remove_stale_temp_files`.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ParamSpec, TypeVar, cast

from .checkpoint import remove_stale_temp_files
from .distributed import broadcast_object, dist_info
from .errors import ExperimentError, write_error

LOCK_NAME = ".flatminima.lock"
_PROC = Path("/proc")

P = ParamSpec("P")
R = TypeVar("R")


def process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (field 22 of
    ``/proc/<pid>/stat``), or None when no such process runs."""
    try:
        text = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Field 2, the command name, is in parentheses and may hold spaces and
    # parentheses itself: count the fields after its last ")" (field 3 first).
    return int(text[text.rindex(")") + 2 :].split()[22 - 3])


def _has_proc() -> bool:
    return (_PROC / "self" / "stat").is_file()


def owner() -> dict[str, Any]:
    """What the lock file of this process holds."""
    pid = os.getpid()
    return {"pid": pid, "start": process_start(pid) if _has_proc() else None, "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S")}


def owner_alive(holder: dict[str, Any]) -> bool:
    """Whether the process that wrote ``holder`` (the lock's contents) may still run."""
    if holder.get("host") != socket.gethostname():
        return True  # its processes cannot be seen from here
    pid, start = holder["pid"], holder.get("start")
    if _has_proc():
        now = process_start(pid)
        return now is not None and (start is None or now == start)
    if sys.platform == "win32":
        return True  # no safe probe: os.kill(pid, 0) would terminate the process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _parse(raw: bytes) -> dict[str, Any] | None:
    try:
        holder = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(holder, dict) or not isinstance(holder.get("pid"), int) or isinstance(holder["pid"], bool):
        return None
    return holder


class RunLock:
    """The lock file of one results folder, held by this process."""

    def __init__(self, path: Path, content: bytes) -> None:
        self.path, self.content = path, content

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        """Create ``folder/.flatminima.lock`` (taking over a stale one), or
        raise :class:`ExperimentError` naming the run that holds it."""
        path = folder / LOCK_NAME
        content = json.dumps(owner()).encode()
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for _ in range(5):  # each turn: the file was removed or taken over in between
                try:
                    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                except FileExistsError:
                    _take_over_if_stale(path, folder)
                    continue
                with os.fdopen(fd, "wb") as f:
                    f.write(content)
                return cls(path, content)
        except OSError as e:  # --out is a file, read-only, ...
            raise write_error(e, folder) from None
        raise ExperimentError(f"cannot lock the results folder {folder}: its lock file {path} kept changing "
                              "(other runs are starting there); use another --out")

    def release(self) -> None:
        """Remove the lock file if it is still this run's."""
        try:
            if self.path.read_bytes() == self.content:
                self.path.unlink()
        except FileNotFoundError:
            pass


def _take_over_if_stale(path: Path, folder: Path) -> None:
    """Remove the lock file at ``path`` if its owner is gone; raise if it is not."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return  # released meanwhile
    holder = _parse(raw)
    if holder is None:
        raise ExperimentError(f"the results folder {folder} is locked by {path}, which is being written or is not a "
                              f"flatminima lock ({raw[:60]!r}); if no run is using the folder, delete {path}")
    if owner_alive(holder):
        where = f" on {holder.get('host')}" if holder.get("host") != socket.gethostname() else ""
        raise ExperimentError(f"the results folder {folder} is in use by another run (pid {holder['pid']}{where}, "
                              f"since {holder.get('since', '?')}); wait for it to finish or use another --out "
                              f"(if no run is using the folder, delete {path})")
    # Stale. Move it aside before deleting it: if another process took it over
    # and a fresh lock now sits there, what is moved is not the stale file, and
    # it goes back (a hard link fails, rather than overwrite, if a third one
    # appeared meanwhile).
    aside = path.with_name(f"{LOCK_NAME}.stale.{os.getpid()}")
    try:
        os.replace(path, aside)
    except FileNotFoundError:
        return
    if aside.read_bytes() != raw:
        try:
            os.link(aside, path)
        except FileExistsError:
            pass
    aside.unlink()


def locked_out(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` (which takes ``out=``) holding the lock of ``out``; rank 0
    takes it, and every rank raises when it is refused. Stale temporary files
    of the folder are removed once the lock is held."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        out = kwargs.get("out")
        if out is None:
            return fn(*args, **kwargs)
        folder = Path(cast("str | os.PathLike[str]", out))  # compare's out=
        lock, refused, error = None, None, None
        if dist_info().is_main:
            try:
                lock = RunLock.acquire(folder)
            except ExperimentError as e:
                refused, error = str(e), e
        refused = broadcast_object(refused)
        if refused is not None:
            raise error or ExperimentError(refused)  # rank 0's own error keeps its exit status
        try:
            if lock is not None:
                removed = remove_stale_temp_files(folder, folder / "runs", folder / "checkpoints")
                if removed:
                    print(f"flatminima: removed {len(removed)} temporary file(s) left by an interrupted write: "
                          + ", ".join(str(p) for p in removed), file=sys.stderr)
            return fn(*args, **kwargs)
        finally:
            if lock is not None:
                lock.release()

    return wrapper
