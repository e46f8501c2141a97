"""Streaming, crash-safe writing of a sharded safetensors checkpoint.

The caller plans every shard's tensors up front (names, dtypes, shapes), so each shard's header
is known before its first byte of data and tensors are written one (or one block of rows) at a
time, never holding a shard in memory. A shard is written to a hidden temporary file and renamed
only when complete, and the index is written last: an interrupted run leaves nothing that looks
like a finished checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from pdmoe.errors import CheckpointError
from pdmoe.io.atomic import Staged, write_text_atomic
from pdmoe.io.reader import INDEX_FILE, SINGLE_FILE
from pdmoe.io.safetensors_format import TensorMeta, encode_header, read_header


def plan_shards(entries: list[TensorMeta], max_shard_bytes: int) -> list[list[TensorMeta]]:
    """Group tensors, in order, into shards of at most ``max_shard_bytes`` (a bigger tensor gets its own).

    A zero-element tensor never opens a shard: every shard has data that opens it when streamed.
    """
    shards: list[list[TensorMeta]] = [[]]
    size = 0
    for meta in entries:
        if shards[-1] and meta.nbytes and size + meta.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(meta)
        size += meta.nbytes
    return shards if shards[0] else []


def shard_file_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def write_index(out_dir: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The index of a sharded checkpoint (tensor name -> shard file), written last and atomically."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    write_text_atomic(Path(out_dir) / INDEX_FILE, json.dumps(index, indent=2) + "\n")


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    return memoryview(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


class ShardWriter:
    """One shard being written: tensors must arrive in plan order, whole or as consecutive row blocks."""

    def __init__(self, path: Path, entries: list[TensorMeta], metadata: dict[str, str] | None) -> None:
        self.path = path
        self.entries = entries
        self._staged = Staged(path)
        self._handle = self._staged.create()
        self._handle.write(encode_header(entries, metadata))
        self._next = 0
        self._written = 0

    def _skip_empty(self, name: str | None = None) -> None:
        """Pass over planned zero-element tensors (they have no data to wait for) up to ``name``."""
        while (
            self._next < len(self.entries)
            and self._written == 0
            and self.entries[self._next].nbytes == 0
            and self.entries[self._next].name != name
        ):
            self._next += 1

    def _expect(self, name: str) -> TensorMeta:
        self._skip_empty(name)
        if self._next >= len(self.entries):
            raise CheckpointError(f"{self.path.name}: {name!r} is not planned for this shard")
        meta = self.entries[self._next]
        if name != meta.name:
            raise CheckpointError(f"{self.path.name}: expected {meta.name!r} next, got {name!r}")
        return meta

    def write(self, name: str, block: torch.Tensor) -> None:
        """Append ``block``: the whole tensor ``name`` or its next rows along dim 0."""
        meta = self._expect(name)
        if tuple(block.shape[1:]) != meta.shape[1:]:
            raise CheckpointError(
                f"{self.path.name}: {name!r} planned as {meta.dtype} {meta.shape}, got {block.dtype} {tuple(block.shape)}"
            )
        self.write_elements(name, block)

    def write_elements(self, name: str, block: torch.Tensor) -> None:
        """Append ``block``'s elements (any shape, C order) as the next elements of tensor ``name``.

        Lets a caller stream a tensor in pieces smaller than one row of dim 0, e.g. one expert's
        rows at a time of a fused [E, 2F, H] expert tensor.
        """
        meta = self._expect(name)
        if block.dtype != meta.dtype:
            raise CheckpointError(f"{self.path.name}: {name!r} planned as {meta.dtype}, got {block.dtype}")
        self._handle.write(tensor_bytes(block))
        self._written += block.numel() * block.element_size()
        if self._written > meta.nbytes:
            raise CheckpointError(f"{self.path.name}: more data than planned for {name!r}")
        if self._written == meta.nbytes:
            self._next += 1
            self._written = 0

    def commit(self) -> None:
        self._skip_empty()
        if self._next != len(self.entries):
            missing = self.entries[self._next].name
            raise CheckpointError(f"{self.path.name}: closed before {missing!r} was written")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        self._staged.commit()

    def abort(self) -> None:
        self._handle.close()
        self._staged.abort()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


class CheckpointWriter:
    """A planned checkpoint: shard names fixed from the plan, shards written and checked one by one."""

    def __init__(
        self, out_dir: Path, shards: list[list[TensorMeta]], metadata: dict[str, str] | None = None
    ) -> None:
        if not shards:
            raise CheckpointError("nothing to write: the checkpoint plan has no tensors")
        self.out_dir = Path(out_dir)
        self.shards = shards
        self.metadata = metadata
        self.file_names = shard_file_names(len(shards))

    @property
    def total_bytes(self) -> int:
        return sum(meta.nbytes for shard in self.shards for meta in shard)

    def shard_is_complete(self, index: int) -> bool:
        """True when shard ``index`` is on disk, whole, and holds exactly the planned tensors."""
        path = self.out_dir / self.file_names[index]
        if not path.is_file():
            return False
        try:
            header = read_header(path)
        except CheckpointError:
            return False
        planned = {meta.name: meta for meta in self.shards[index]}
        return (
            header.tensors == planned
            and header.data_end == path.stat().st_size
            and header.metadata == {"format": "pt", **(self.metadata or {})}
        )

    def open_shard(self, index: int) -> ShardWriter:
        return ShardWriter(self.out_dir / self.file_names[index], self.shards[index], self.metadata)

    def finish(self) -> None:
        """Write the index (when sharded) last, after every shard is in place."""
        for index, name in enumerate(self.file_names):
            if not self.shard_is_complete(index):
                raise CheckpointError(
                    f"shard {name} is missing or incomplete; the checkpoint was not finished"
                )
        if len(self.file_names) == 1:
            return
        weight_map = {
            meta.name: name
            for name, shard in zip(self.file_names, self.shards, strict=True)
            for meta in shard
        }
        write_index(self.out_dir, weight_map, self.total_bytes)
