"""Checkpoints and result files written atomically: to a temporary file in the
same folder, flushed to disk, then ``os.replace``-d over the target, so an
interruption at any moment leaves either the old file or the new one. A
SIGKILL mid-write leaves the temporary file (``.<name>.<8 random
characters>.tmp``) behind; :func:`remove_stale_temp_files` removes those of a
folder that no other process writes (the results folder, under its lock)."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from .errors import ExperimentError, write_error

CHECKPOINT_FORMAT = 1


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


# mkstemp's names: the prefix, 8 characters of [a-z0-9_], the suffix.
_TEMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(_TEMP_SUFFIX))


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], object]) -> None:
    """Write ``path`` through ``write(file)``, atomically; a file system error
    (read-only, permission, disk full) is a one-line :class:`WriteError`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TEMP_SUFFIX)
    except OSError as e:
        raise write_error(e, path) from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise write_error(e, path) from None
        raise


def remove_stale_temp_files(*folders: Path) -> list[Path]:
    """Remove the temporary files :func:`atomic_write` left in ``folders`` (not
    their sub-folders) when it was killed, and return them. Only for folders
    no other process is writing: a live write's file looks the same."""
    removed = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for entry in sorted(folder.iterdir()):
            if _TEMP_NAME.fullmatch(entry.name) and entry.is_file() and not entry.is_symlink():
                entry.unlink()
                removed.append(entry)
    return removed


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _json_safe(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # JSON has no NaN/inf
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2) + "\n")


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Any]) -> None:
    """``torch.save`` of ``state`` (plus the format tag), atomically."""
    payload = {"format": CHECKPOINT_FORMAT, **state}
    atomic_write(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint` (tensors on the CPU)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        # one line, never torch's advice to load with weights_only=False
        from flatminima.sharpness.cli import describe_load_failure

        raise ExperimentError(f"cannot read checkpoint {path}: {describe_load_failure(e)}; remove it to start the run "
                              "afresh") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ExperimentError(f"{path} is not a flatminima experiment checkpoint (format {CHECKPOINT_FORMAT})")
    return state
