"""One streamed checkpoint output: the steps upcycle, graft and export share, in their order.

A command claims its output folder (``claim_checkpoint``, or ``StreamingCheckpoint`` over a folder
it claimed itself), checks the free space, writes ``config.json`` and the side files atomically,
streams its planned shards through the background writer, and ``finish``-es: the index after every
shard, then the marker ``complete``. What each command keeps is only what is its own: which tensors
it produces (and, for graft, which shards a resumed run reuses).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pdmoe.io.atomic import write_json
from pdmoe.io.background import BackgroundShardWriter, BlockPool, run_single_threaded
from pdmoe.io.outputs import Command, OutputFolder, claim_output, ensure_free_space
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.side_files import SIDE_FILES, copy_side_files
from pdmoe.io.writer import CheckpointWriter

CONFIG_FILE = "config.json"
# (shard index, tensor name, block): the next elements of that tensor, in plan order.
ShardBlock = tuple[int, str, torch.Tensor]


class StreamingCheckpoint:
    """A checkpoint written into the claimed ``folder``; ``shards`` (when the command streams its
    tensors) is the plan the background writer fills, ``metadata`` goes into every shard header."""

    def __init__(
        self,
        folder: OutputFolder,
        shards: list[list[TensorMeta]] | None = None,
        *,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.folder = folder
        self.path = folder.path
        self.writer = CheckpointWriter(folder.path, shards, metadata) if shards is not None else None

    def ensure_space(self, needed_bytes: int | None = None) -> None:
        """Refuse before writing when the folder's file system lacks ``needed_bytes`` (default: the plan's)."""
        if needed_bytes is None:
            assert self.writer is not None, "a checkpoint without planned shards needs needed_bytes"
            needed_bytes = self.writer.total_bytes
        ensure_free_space(self.path, needed_bytes)

    def write_json(self, name: str, payload: dict[str, Any]) -> None:
        write_json(self.path / name, payload)

    def write_config(self, config: dict[str, Any]) -> None:
        self.write_json(CONFIG_FILE, config)

    def copy_side_files(self, source: Path, names: tuple[str, ...] = SIDE_FILES) -> list[str]:
        return copy_side_files(source, self.path, names)

    def stream(self, blocks: Callable[[], Iterable[ShardBlock]], *, pool: BlockPool | None = None) -> int:
        """Write every block ``blocks()`` yields, reading and computing on one core while the writer
        thread writes on the other (``run_single_threaded``); returns the bytes written."""
        assert self.writer is not None, "stream needs planned shards"
        writer = self.writer

        def stream_all() -> int:
            written = 0
            with BackgroundShardWriter(writer, pool=pool) as background:
                for shard, name, block in blocks():
                    background.write(shard, name, block)
                    written += block.nbytes
            return written

        return run_single_threaded(stream_all)

    def finish(self, *, drop: Iterable[str] = ()) -> None:
        """Write the index once every planned shard is whole, remove the run's own files ``drop``,
        and mark the output complete (the last write)."""
        if self.writer is not None:
            self.writer.finish()
        for name in drop:
            (self.path / name).unlink()
        self.folder.finish()


@contextlib.contextmanager
def claim_checkpoint(
    out: Path,
    command: Command,
    shards: list[list[TensorMeta]] | None = None,
    *,
    metadata: dict[str, str] | None = None,
    **claim: Any,
) -> Iterator[StreamingCheckpoint]:
    """``claim_output(out, command, **claim)`` held for a ``StreamingCheckpoint`` of ``shards``: on
    failure the folder is handled as ``claim_output`` says (removed unless ``keep_partial``)."""
    with claim_output(out, command, **claim) as folder:
        yield StreamingCheckpoint(folder, shards, metadata=metadata)
