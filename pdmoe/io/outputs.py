"""Output folders: created before anything is written, checked for room, never mixed up with inputs."""

from __future__ import annotations

import shutil
from pathlib import Path

from pdmoe.errors import CheckpointError

_FREE_SPACE_MARGIN = 64 * 1024 * 1024


def prepare_output_dir(
    out_dir: Path, *, overwrite: bool, resume: bool = False, inputs: tuple[Path, ...] = ()
) -> None:
    """Create ``out_dir``; refuse a non-empty one unless told to overwrite it or resume into it."""
    out_dir = Path(out_dir)
    for source in inputs:
        if out_dir.resolve() == Path(source).resolve():
            raise CheckpointError(f"output directory {out_dir} is also an input; choose another --out")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise CheckpointError(f"output directory {out_dir} is not empty; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)


def ensure_free_space(out_dir: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(out_dir).free
    if free < needed_bytes + _FREE_SPACE_MARGIN:
        raise CheckpointError(
            f"{out_dir} has {free / 2**30:.2f} GiB free but the output needs {needed_bytes / 2**30:.2f} GiB; "
            "free some space or choose another --out"
        )
