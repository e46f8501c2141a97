"""TIES and DARE grafts of one output tensor, streamed block by block.

The runner does the I/O and hands in ``read``; the math is ``merging``'s. Per row block of a
``RowSource.DELTA`` piece, for expert e (or the plain tensor):

    out = BASE + merge(τ_CPT = CPT_e − BASE, τ_INSTRUCT = INSTRUCT − BASE)      (dense rows of BASE)

Units (see ``merging``): CPT's task vector is trimmed / dropped per (expert, piece); INSTRUCT's
per piece, once, and the result serves every expert, like the task-arithmetic graft's delta (kept
for one expert's slice). TIES first finds every unit's magnitude threshold with extra passes over
the unit (one per 16 bits of the working dtype), so TIES reads its inputs several times.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from pdmoe.graft.merging import (
    MergeMethod,
    MergeSpec,
    Trim,
    dare_keep_mask,
    dare_merge,
    magnitude_threshold,
    ties_merge,
)
from pdmoe.graft.planner import Piece, Role, RowSource, TensorPlan

# Elements merged at a time. TIES and DARE make about ten temporaries of this size in the working
# dtype and as int64 magnitudes, so this is a quarter of the runner's read block.
MERGE_ELEMENTS = 2**20

ReadFn = Callable[[Role, str, int, int], torch.Tensor]
Span = tuple[Piece, int, int]  # piece, first row, row after the last


class MergedTensor:
    """The merged blocks of one tensor plan's delta pieces."""

    def __init__(
        self,
        plan: TensorPlan,
        spans: list[Span],
        read: ReadFn,
        spec: MergeSpec,
        alpha: float,
        work: torch.dtype,
    ):
        self.plan, self.spans, self.read, self.spec, self.work = plan, spans, read, spec, work
        self.weights = (1.0, alpha)
        self._instruct: dict[int, torch.Tensor] = {}  # span index -> INSTRUCT's processed task vector
        self._trims: dict[tuple[int, int], Trim] = {}  # (expert or -1 for INSTRUCT, piece index) -> trim
        if spec.method is MergeMethod.TIES:
            self._find_thresholds()

    def _pieces(self) -> list[Piece]:
        return [piece for piece in self.plan.pieces if piece.source is RowSource.DELTA]

    def _dense_offset(self, piece: Piece, row: int) -> int:
        return (piece.dense_start + row - piece.start) * self.plan.width

    def _base(self, piece: Piece, start: int, stop: int) -> torch.Tensor:
        count = (stop - start) * self.plan.width
        return self.read(Role.BASE, piece.dense, self._dense_offset(piece, start), count).to(
            self.work, copy=True
        )

    def _task_vector(
        self, role: Role, expert: int, piece: Piece, start: int, stop: int, base: torch.Tensor
    ) -> torch.Tensor:
        """The task vector of ``role`` on rows [start, stop), whose BASE rows are ``base`` (a new tensor)."""
        count = (stop - start) * self.plan.width
        if role is Role.INSTRUCT:
            tuned = self.read(Role.INSTRUCT, piece.dense, self._dense_offset(piece, start), count)
        else:
            offset = (expert * self.plan.rows + start) * self.plan.width
            tuned = self.read(Role.CPT, self.plan.out.name, offset, count)
        return tuned.to(base.dtype) - base

    def _unit_blocks(self, role: Role, expert: int, piece: Piece) -> Callable[[], Iterator[torch.Tensor]]:
        step = max(1, MERGE_ELEMENTS // self.plan.width)

        def blocks() -> Iterator[torch.Tensor]:
            for start in range(piece.start, piece.stop, step):
                stop = min(start + step, piece.stop)
                yield self._task_vector(role, expert, piece, start, stop, self._base(piece, start, stop))

        return blocks

    def _find_thresholds(self) -> None:
        for index, piece in enumerate(self._pieces()):
            numel = (piece.stop - piece.start) * self.plan.width
            units = [(Role.INSTRUCT, -1)] + [(Role.CPT, e) for e in range(max(self.plan.experts, 1))]
            for role, expert in units:
                threshold = magnitude_threshold(
                    self._unit_blocks(role, max(expert, 0), piece), numel, self.spec.density
                )
                self._trims[(expert, index)] = Trim(threshold)

    def _unit(self, role: Role, expert: int, piece: Piece) -> str:
        if role is Role.INSTRUCT:
            return f"instruct:{piece.dense}"
        return f"cpt:{self.plan.out.name}:{expert}:{piece.start}"

    def block(self, expert: int, span_index: int, out: torch.Tensor) -> torch.Tensor:
        """Output rows of span ``span_index`` of ``expert`` into ``out`` (the output dtype), each
        element rounded once, merged ``MERGE_ELEMENTS`` at a time."""
        piece, start, stop = self.spans[span_index]
        piece_index = self._pieces().index(piece)
        rows = max(1, MERGE_ELEMENTS // self.plan.width)
        for first in range(start, stop, rows):
            last = min(first + rows, stop)
            lo, hi = (first - start) * self.plan.width, (last - start) * self.plan.width
            base = self._base(piece, first, last)  # read once for both task vectors
            if expert > 0:
                instruct = self._instruct[span_index][lo:hi]
            else:
                instruct = self._processed_instruct(piece, piece_index, first, last, base)
                if self.plan.experts:  # kept for the other experts: one expert's slice at most
                    if span_index not in self._instruct:
                        span = (stop - start) * self.plan.width
                        self._instruct[span_index] = torch.empty(span, dtype=self.work)
                    self._instruct[span_index][lo:hi] = instruct
            cpt = self._task_vector(Role.CPT, expert, piece, first, last, base)
            if self.spec.method is MergeMethod.TIES:
                cpt = torch.where(self._trims[(expert, piece_index)].mask(cpt), cpt, 0)
                merged = ties_merge([cpt, instruct], self.weights)
            else:
                offset = (first - piece.start) * self.plan.width
                keep = dare_keep_mask(
                    self.spec.seed, self._unit(Role.CPT, expert, piece), offset, hi - lo, self.spec.density
                )
                everything = torch.ones_like(keep)
                merged = dare_merge([cpt, instruct], [keep, everything], self.weights, self.spec.density)
            out[lo:hi].copy_(base.add_(merged))
        return out

    def _processed_instruct(
        self, piece: Piece, piece_index: int, first: int, last: int, base: torch.Tensor
    ) -> torch.Tensor:
        """INSTRUCT's task vector of rows [first, last) of ``piece``, trimmed (TIES) or dropped (DARE)."""
        instruct = self._task_vector(Role.INSTRUCT, 0, piece, first, last, base)
        if self.spec.method is MergeMethod.TIES:
            return torch.where(self._trims[(-1, piece_index)].mask(instruct), instruct, 0)
        offset, count = self._dense_offset(piece, first), instruct.numel()
        keep = dare_keep_mask(
            self.spec.seed, self._unit(Role.INSTRUCT, 0, piece), offset, count, self.spec.density
        )
        return torch.where(keep, instruct, 0)
