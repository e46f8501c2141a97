"""Errors that carry a message meant for the user: what is wrong and how to fix it.

The command line prints these without a traceback and exits non-zero.
"""


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
