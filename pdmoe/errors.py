"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The command line prints these without a traceback and exits non-zero. Operating-system errors that
the user can fix (a full disk, a missing permission, a read-only file system) become such errors at
the command line too (``from_os_error``); any other OSError is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class PdmoeError(Exception):
    """Base class of every error pdmoe raises on purpose."""


class CheckpointError(PdmoeError):
    """A checkpoint on disk is missing, truncated, malformed or not what the command needs."""


class UsageError(PdmoeError):
    """Options or arguments that cannot work together, or an option value that cannot work."""


class DataError(PdmoeError):
    """A data file is missing, empty, not in its declared format, or tagged with an undeclared language."""


class TrainingError(PdmoeError):
    """Training cannot go on: the loss or the gradients stopped being finite."""


class TensorValueError(CheckpointError):
    """Tensor values refused while streaming: non-finite numbers, an overflow, or a CPT model whose
    frozen tensors are not BASE's."""


# What the user can do about an OSError, by errno.
_OS_ERROR_FIXES = {
    errno.ENOSPC: "free some space, or write somewhere else",
    errno.EDQUOT: "free some space within your quota, or write somewhere else",
    errno.EFBIG: "the file system limits file sizes: choose a smaller --shard-size or another file system",
    errno.EACCES: "check the permissions of that path",
    errno.EPERM: "check the permissions of that path",
    errno.EROFS: "write somewhere else",
    errno.ENAMETOOLONG: "choose a shorter path",
}


def from_os_error(error: OSError) -> PdmoeError | None:
    """The user error for an OSError the user can fix (naming the file and the fix), else None."""
    fix = _OS_ERROR_FIXES.get(error.errno)
    if fix is None:
        return None
    where = f": {error.filename}" if error.filename is not None else ""
    return PdmoeError(f"{error.strerror or error}{where}; {fix}")
