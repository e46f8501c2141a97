"""Writing planned shards on a background thread.

Writing (and the fsync that makes a shard durable) releases the GIL, so a thread that does only
that lets the caller read and compute the next blocks meanwhile: with two cores, I/O and
arithmetic overlap. The queue is bounded, so at most ``max_pending`` blocks wait in memory.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

from pdmoe.io.writer import CheckpointWriter, ShardWriter

T = TypeVar("T")
_DONE = object()
_ABORT = object()


class BackgroundShardWriter:
    """Sends blocks of planned shards to a writer thread; shards are committed in the order written.

    ``write(shard, name, block)`` appends ``block``'s elements to tensor ``name`` of shard
    ``shard``; moving on to another shard commits the previous one. Shards may be skipped (resume),
    not revisited. An error on the thread is raised by the next call, and the shard being written
    is discarded, so nothing incomplete appears under a final name.
    """

    def __init__(self, writer: CheckpointWriter, max_pending: int = 4) -> None:
        self._writer = writer
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
            if self._error is not None:
                continue  # drain until the caller notices the error
            shard, name, block = item
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
