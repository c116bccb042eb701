"""Errors the experiment tool reports to the user as one clear line (no traceback).

The command prints ``flatminima: error: <message>`` and exits with the
error's :attr:`~ExperimentError.exit_status`: 2 for bad input (settings,
data, checkpoints, an ``--out`` that cannot be written), 1 for a run that
started and could not finish (the disk filled up).
"""

from __future__ import annotations

import errno
import os


class ExperimentError(Exception):
    """Base class: the command prints ``flatminima: error: <message>`` and exits with status 2."""

    exit_status = 2


class ConfigError(ExperimentError, ValueError):
    """A bad setting: unknown method or key, value out of range, malformed TOML file."""


class DataError(ExperimentError, OSError):
    """A data set that cannot be read: missing folder or file, wrong layout or contents."""


class MethodFailed(ConfigError):
    """A method that cannot run with the given settings (it cannot be built for
    the model, or it failed at its first step); ``compare`` reports it and goes
    on with the other methods."""


class WriteError(ExperimentError, OSError):
    """A file of the results folder that cannot be written. An ``OSError`` too,
    so that callers treating a write as optional (the MNIST-1D cache) still can."""

    def __init__(self, message: str, exit_status: int = 2) -> None:
        super().__init__(message)
        self.exit_status = exit_status


# A full disk stops a run that had started; the other causes are the folder's.
_NO_SPACE = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_error(error: OSError, path: str | os.PathLike[str]) -> ExperimentError:
    """The one-line error for ``error``, raised while writing ``path``, saying what to do."""
    if isinstance(error, ExperimentError):
        return error
    where = f"{path}" + (f" ({error.filename})" if error.filename and str(error.filename) != str(path) else "")
    code = error.errno
    if code in _NO_SPACE:
        return WriteError(f"no space left on the disk while writing {where}; free some space and run the command "
                          "again (with --resume, the finished runs and checkpoints saved there are kept)",
                          exit_status=1)
    if code == errno.EROFS:
        return WriteError(f"cannot write {where}: the file system is read-only; give --out a folder on a writable disk")
    if code in (errno.EACCES, errno.EPERM):
        return WriteError(f"cannot write {where}: permission denied; give --out a folder you may write to")
    if code in (errno.EEXIST, errno.ENOTDIR):
        return WriteError(f"cannot write {where}: a file stands where a folder must be; --out must be a folder "
                          "(a new one, or one holding results), not a file or a path through a file")
    return WriteError(f"cannot write {where}: {error.strerror or error}", exit_status=1)
