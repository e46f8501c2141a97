"""Writing planned shards on a background thread.

Writing (and the fsync that makes a shard durable) releases the GIL, so a thread that does only
that lets the caller read and compute the next blocks meanwhile: with two cores, I/O and
arithmetic overlap. The queue is bounded, so at most ``max_pending`` blocks wait in memory, and
blocks taken from a ``BlockPool`` go back to it once written, so a long stream allocates a handful
of blocks instead of one per write.
"""

from __future__ import annotations

import collections
import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from pdmoe.io.writer import CheckpointWriter, ShardWriter

T = TypeVar("T")
_DONE = object()
_ABORT = object()


class BlockPool:
    """Output blocks that are written and then reused, instead of a fresh allocation per block.

    A fresh block per write costs page faults, and glibc keeps the memory of blocks freed on the
    writer thread (its mmap threshold rises after the first such frees, and blocks then come from
    arenas that rarely shrink): the resident set grows by hundreds of MiB over a model. Buffers
    here are allocated once each (as many as are in flight at once: the queue's plus two) and
    grow to the largest block asked for.
    """

    def __init__(self) -> None:
        self._free: collections.deque[torch.Tensor] = collections.deque()
        self._owned: dict[int, torch.Tensor] = {}

    def take(self, count: int, dtype: torch.dtype) -> torch.Tensor:
        """A block of ``count`` elements of ``dtype`` (contents undefined) owned by the caller until
        ``give``-n back (the writer thread does that once the block is written)."""
        nbytes = count * dtype.itemsize
        try:
            buffer = self._free.pop()
        except IndexError:
            buffer = torch.empty(0, dtype=torch.uint8)
        if buffer.numel() < nbytes:
            self._owned.pop(buffer.data_ptr(), None)
            buffer = torch.empty(nbytes, dtype=torch.uint8)
            self._owned[buffer.data_ptr()] = buffer
        return buffer[:nbytes].view(dtype)

    @property
    def buffers(self) -> int:
        """How many buffers the pool has allocated (and holds, free or lent)."""
        return len(self._owned)

    def give(self, block: torch.Tensor) -> None:
        """Return a block of ``take``; a tensor the pool did not hand out is ignored."""
        buffer = self._owned.get(block.untyped_storage().data_ptr())
        if buffer is not None:
            self._free.append(buffer)


class BackgroundShardWriter:
    """Sends blocks of planned shards to a writer thread; shards are committed in the order written.

    ``write(shard, name, block)`` appends ``block``'s elements to tensor ``name`` of shard
    ``shard``; moving on to another shard commits the previous one. Shards may be skipped (resume),
    not revisited. An error on the thread is raised by the next call, and the shard being written
    is discarded, so nothing incomplete appears under a final name. Written blocks go back to
    ``pool`` when one is given.
    """

    def __init__(self, writer: CheckpointWriter, max_pending: int = 4, pool: BlockPool | None = None) -> None:
        self._writer = writer
        self._pool = pool
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="pdmoe-shard-writer", daemon=True)
        self._thread.start()

    def write(self, shard: int, name: str, block: torch.Tensor) -> None:
        self._raise_pending()
        self._queue.put((shard, name, block))

    def close(self) -> None:
        """Commit the last shard and wait for the thread; raises what went wrong on it."""
        self._queue.put(_DONE)
        self._thread.join()
        self._raise_pending()

    def abort(self) -> None:
        """Discard the shard being written and stop the thread."""
        self._queue.put(_ABORT)
        self._thread.join()

    def __enter__(self) -> BackgroundShardWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _raise_pending(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        current: ShardWriter | None = None
        current_index = -1
        while True:
            item = self._queue.get()
            if item is _DONE or item is _ABORT:
                if current is not None:
                    self._finish(current, commit=item is _DONE)
                return
            shard, name, block = item
            if self._error is None:  # else drain until the caller notices the error
                try:
                    if shard != current_index:
                        if current is not None:
                            current.commit()
                        current, current_index = self._writer.open_shard(shard), shard
                    current.write_elements(name, block)
                except BaseException as exc:
                    self._error = exc
                    if current is not None:
                        current.abort()
                    current = None
            if self._pool is not None:
                self._pool.give(block)

    def _finish(self, current: ShardWriter, *, commit: bool) -> None:
        try:
            if commit and self._error is None:
                current.commit()
            else:
                current.abort()
        except BaseException as exc:
            self._error = exc
            current.abort()


def run_single_threaded(work: Callable[[], T]) -> T:
    """Run ``work`` on a thread of its own with one intra-op thread: reading and arithmetic on one
    core, the writer thread on the other.

    The elementwise ops and reductions of streaming are memory-bound; a second OpenMP thread gains
    little and, when the writer thread (or anything else) holds the other core, spin-waits:
    measured 1.5-3x slower on 2 cores, over 10x for a reduction on a loaded machine. torch's
    intra-op thread count belongs to the calling thread, so the caller's stays as it was.
    """
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        torch.set_num_threads(1)
        try:
            result.append(work())
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=run, name="pdmoe-compute")
    worker.start()
    worker.join()
    if errors:
        raise errors[0]
    return result[0]
