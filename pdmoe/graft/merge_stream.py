"""Task-vector merges (``TaskVectorMerge``: TIES, DARE) of one output tensor, streamed block by block.

The runner does the I/O and hands in ``read``; the method's strategy does the math. Per row block of a
``RowSource.DELTA`` piece, for expert e (or the plain tensor):

    out = BASE + merge(τ_CPT = CPT_e − BASE, τ_INSTRUCT = INSTRUCT − BASE)      (dense rows of BASE)

Units (see ``merging``): CPT's task vector is trimmed / dropped per (expert, piece); INSTRUCT's
per piece, once, and the result serves every expert, like the task-arithmetic graft's delta (kept
for one expert's slice). A strategy may first look at whole units (``unit_blocks``: TIES finds its
thresholds there) and keeps what it found in ``state``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from pdmoe.graft.methods import MergeSpec, TaskVectorMerge
from pdmoe.graft.planner import Piece, Role, RowSource, TensorPlan

# Elements merged at a time. TIES and DARE make about ten temporaries of this size in the working
# dtype and as int64 magnitudes, so this is a quarter of the runner's read block.
MERGE_ELEMENTS = 2**20

ReadFn = Callable[[Role, str, int, int], torch.Tensor]
Span = tuple[Piece, int, int]  # piece, first row, row after the last


class MergedTensor:
    """The merged blocks of one tensor plan's delta pieces, by ``strategy``'s hooks."""

    def __init__(
        self,
        plan: TensorPlan,
        spans: list[Span],
        read: ReadFn,
        strategy: TaskVectorMerge,
        spec: MergeSpec,
        scale: float,
        work: torch.dtype,
    ):
        self.plan, self.spans, self.read, self.spec, self.work = plan, spans, read, spec, work
        self.strategy = strategy
        self.weights = (1.0, scale)
        self.pieces = [piece for piece in plan.pieces if piece.source is RowSource.DELTA]
        self._instruct: dict[int, torch.Tensor] = {}  # span index -> INSTRUCT's processed task vector
        self.state = strategy.prepare(self)

    def dense_offset(self, piece: Piece, row: int) -> int:
        """Element offset of output row ``row`` of ``piece`` in its dense tensor."""
        return (piece.dense_start + row - piece.start) * self.plan.width

    def _base(self, piece: Piece, start: int, stop: int) -> torch.Tensor:
        count = (stop - start) * self.plan.width
        return self.read(Role.BASE, piece.dense, self.dense_offset(piece, start), count).to(
            self.work, copy=True
        )

    def _task_vector(
        self, role: Role, expert: int, piece: Piece, start: int, stop: int, base: torch.Tensor
    ) -> torch.Tensor:
        """The task vector of ``role`` on rows [start, stop), whose BASE rows are ``base`` (a new tensor)."""
        count = (stop - start) * self.plan.width
        if role is Role.INSTRUCT:
            tuned = self.read(Role.INSTRUCT, piece.dense, self.dense_offset(piece, start), count)
        else:
            offset = (expert * self.plan.rows + start) * self.plan.width
            tuned = self.read(Role.CPT, self.plan.out.name, offset, count)
        return tuned.to(base.dtype) - base

    def unit_blocks(self, role: Role, expert: int, piece: Piece) -> Callable[[], Iterator[torch.Tensor]]:
        """The unit's task vector, in blocks of rows in index order, read again at each call."""
        step = max(1, MERGE_ELEMENTS // self.plan.width)

        def blocks() -> Iterator[torch.Tensor]:
            for start in range(piece.start, piece.stop, step):
                stop = min(start + step, piece.stop)
                yield self._task_vector(role, expert, piece, start, stop, self._base(piece, start, stop))

        return blocks

    def unit_name(self, role: Role, expert: int, piece: Piece) -> str:
        """The unit's name, stable across runs (DARE seeds its masks with it)."""
        if role is Role.INSTRUCT:
            return f"instruct:{piece.dense}"
        return f"cpt:{self.plan.out.name}:{expert}:{piece.start}"

    def block(self, expert: int, span_index: int, out: torch.Tensor) -> torch.Tensor:
        """Output rows of span ``span_index`` of ``expert`` into ``out`` (the output dtype), each
        element rounded once, merged ``MERGE_ELEMENTS`` at a time."""
        piece, start, stop = self.spans[span_index]
        piece_index = self.pieces.index(piece)
        rows = max(1, MERGE_ELEMENTS // self.plan.width)
        for first in range(start, stop, rows):
            last = min(first + rows, stop)
            lo, hi = (first - start) * self.plan.width, (last - start) * self.plan.width
            base = self._base(piece, first, last)  # read once for both task vectors
            if expert > 0:
                instruct = self._instruct[span_index][lo:hi]
            else:
                raw = self._task_vector(Role.INSTRUCT, 0, piece, first, last, base)
                instruct = self.strategy.instruct_vector(self, piece, piece_index, first, raw)
                if self.plan.experts:  # kept for the other experts: one expert's slice at most
                    if span_index not in self._instruct:
                        span = (stop - start) * self.plan.width
                        self._instruct[span_index] = torch.empty(span, dtype=self.work)
                    self._instruct[span_index][lo:hi] = instruct
            cpt = self._task_vector(Role.CPT, expert, piece, first, last, base)
            merged = self.strategy.merge_block(self, expert, piece, piece_index, first, cpt, instruct)
            out[lo:hi].copy_(base.add_(merged))
        return out
