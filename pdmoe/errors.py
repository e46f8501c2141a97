"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The command line prints these without a traceback and exits non-zero. Operating-system errors that
the user can fix (a full disk, a missing permission, a read-only file system) become such errors at
the command line too (``from_os_error``); any other OSError is a bug and keeps its traceback.

An error about options names them as ``Option`` values, not as spelled flags: the Python API and
the command line name the same option differently (``allow_modified_base=True`` against
``--allow-modified-base``), so the message is a template that each renders in its own spelling
(``PdmoeError.render``; ``str(error)`` is the Python spelling). The error also keeps what kind of
problem it is (``Problem``) and the options involved, so callers and tests need not parse text.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from string import Formatter


class Problem(Enum):
    """What is wrong with the options an error names."""

    INVALID = "invalid"  # a value that cannot work (out of range, unreadable, too large for the model)
    MISSING = "missing"  # something has to be given and was not
    CONFLICT = "conflict"  # options given together that cannot work together
    REFUSED = "refused"  # pdmoe does not go on unless an option says so (an --allow-..., --resume)


@dataclass(frozen=True)
class Option:
    """An option an error message names: its field name (the Python keyword and the destination of
    the command-line flag) and, when the message tells the user what to give, that value (True: a
    switch to turn on)."""

    name: str
    value: object = None


Spelling = Callable[[Option], str]


def keyword_spelling(option: Option) -> str:
    """How the Python API names an option: ``scale``, ``allow_modified_base=True``, ``format='mixtral'``."""
    return option.name if option.value is None else f"{option.name}={option.value!r}"


def fill(template: str, values: Mapping[str, object], spell: Spelling) -> str:
    """``template`` (``str.format``) filled with ``values``, every ``Option`` among them named by ``spell``."""
    return template.format_map(
        {key: spell(value) if isinstance(value, Option) else value for key, value in values.items()}
    )


class PdmoeError(Exception):
    """Base class of every error pdmoe raises on purpose.

    ``message`` is plain text, or, when ``values`` are given, a ``str.format`` template filled with
    them; the values that are ``Option`` are spelled by whoever renders it."""

    def __init__(self, message: str, /, *, problem: Problem | None = None, **values: object) -> None:
        self.template = message
        self.problem = problem
        self.values = values
        super().__init__(self.render(keyword_spelling))

    @property
    def options(self) -> tuple[Option, ...]:
        """The options the message names, in the order it first names them."""
        fields = dict.fromkeys(field for _, field, _, _ in Formatter().parse(self.template) if field)
        return tuple(self.values[field] for field in fields if isinstance(self.values.get(field), Option))

    def render(self, spell: Spelling) -> str:
        """The message with every option named by ``spell``."""
        return fill(self.template, self.values, spell) if self.values else self.template


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
    errno.EFBIG: "the file system limits file sizes: choose a smaller {shard_size} or another file system",
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
    return PdmoeError(
        "{reason}{where}; " + fix,
        reason=error.strerror or error,
        where=where,
        shard_size=Option("shard_size"),
    )
