"""Files and folders that appear under their final name only when complete.

Everything pdmoe writes is first written to a hidden sibling (``.NAME.partial``) and renamed into
place when whole: a reader, or a run that was killed, sees the old state or the new one, never a
half-written file under a name that looks finished.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO, TextIO

from pdmoe.errors import CheckpointError


class Staged:
    """A hidden sibling ``path`` of ``final`` to write into (a file, or a folder the caller creates).

    ``commit()`` renames it to ``final``; ``abort()`` removes it. As a context manager it yields
    ``path`` (a stale one of an earlier killed run removed first), commits on success and aborts on
    an exception. ``tag`` makes the name unique when several processes may stage the same target.
    """

    def __init__(self, final: str | Path, *, tag: str = "") -> None:
        self.final = Path(final)
        self.path = self.final.with_name(f".{self.final.name}{tag}.partial")

    def commit(self) -> None:
        """Rename into place; an existing ``final`` file is replaced (a link there is replaced, never
        followed), a folder in the way of a file and a non-empty folder are not."""
        try:
            os.replace(self.path, self.final)
        except (IsADirectoryError, NotADirectoryError):
            raise CheckpointError(
                f"cannot write {self.final}: something that is not a file is in its place "
                "(pdmoe did not make it); remove it, or choose another output"
            ) from None

    def commit_files_into(self, directory: Path, last: str) -> None:
        """Move the staged folder's files into ``directory`` (each rename atomic), ``last`` after all
        the others, so a reader that waits for ``last`` finds everything; then drop the staged folder."""
        names = sorted(path.name for path in self.path.iterdir())
        for name in [*(n for n in names if n != last), *([last] if last in names else [])]:
            os.replace(self.path / name, Path(directory) / name)
        self.path.rmdir()

    def create(self) -> BinaryIO:
        """The staged file opened for writing as a new file: a stale one of a killed run (or a link
        planted in its place) is removed first, and the open follows no link."""
        self.abort()
        return os.fdopen(
            os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb"
        )

    def abort(self) -> None:
        if self.path.is_dir() and not self.path.is_symlink():
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> Path:
        self.abort()
        return self.path

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.abort()
            return
        try:
            self.commit()
        except BaseException:
            self.abort()
            raise


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` in one step: a reader sees the old file or the new one, never half."""
    with Staged(path) as staged:
        staged.write_text(text)


def open_to_append(path: str | Path) -> TextIO:
    """``path`` opened to append text, created when missing, never through a link (a planted one
    is an OSError, ELOOP)."""
    return os.fdopen(os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644), "a")


def write_json(path: str | Path, payload: dict[str, Any]) -> None:
    """Write a JSON side file atomically (configs, manifests)."""
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True) + "\n")
