"""JSON from checkpoints, read strictly: one meaning per document, or a CheckpointError.

Python's ``json`` lets the last of two equal keys win silently and raises ``RecursionError`` on
deep nesting; a file crafted that way could then mean one thing to pdmoe and another to the next
tool. Here a duplicate key, invalid UTF-8, non-standard constants (NaN, Infinity) or nesting
deeper than the interpreter allows are errors that name the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pdmoe.errors import CheckpointError


class _DuplicateKey(ValueError):
    pass


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(f"the key {key!r} appears twice in one object")
        result[key] = value
    return result


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number"}
    return names.get(type(value), type(value).__name__)


def parse_json(raw: bytes | str, source: str | Path) -> Any:
    """The value of the JSON document ``raw`` (read from ``source``, named in errors)."""
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        return json.loads(text, object_pairs_hook=_unique_keys, parse_constant=_no_constant)
    except UnicodeDecodeError as exc:
        raise CheckpointError(
            f"{source} is not UTF-8 (byte {exc.start}); re-download or re-create it"
        ) from None
    except RecursionError:
        raise CheckpointError(f"{source} nests JSON too deeply to be a checkpoint file") from None
    except ValueError as exc:
        raise CheckpointError(f"{source} is not valid JSON: {exc}") from None


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object (``{...}``) stored in ``path``; anything else is a CheckpointError."""
    path = Path(path)
    value = parse_json(path.read_bytes(), path)
    if not isinstance(value, dict):
        raise CheckpointError(
            f"{path} must hold a JSON object ({{...}}), not {json_type(value)}; re-download or re-create it"
        )
    return value
