"""The installed pdmoe's version: what ``pdmoe --version`` prints and every output marker records."""

from __future__ import annotations

import importlib.metadata


def pdmoe_version() -> str:
    try:
        return importlib.metadata.version("pdmoe")
    except importlib.metadata.PackageNotFoundError:
        return "unknown (not installed)"
