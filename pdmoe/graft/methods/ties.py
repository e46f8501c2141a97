"""TIES (Yadav et al. 2023): trim each task vector to its ⌊density·n⌋ largest magnitudes per unit,
elect the sign of the weighted sum, take the weighted mean of the agreeing entries (``merging``).

Streamed, every unit's threshold is found first, with extra passes over the unit (one per 16 bits
of the working dtype), so TIES reads its inputs several times.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.graft.methods.registry import MergeMethod, MergeSpec, TaskVectorMerge, register, require_density

if TYPE_CHECKING:
    import torch

    from pdmoe.graft.merge_stream import MergedTensor
    from pdmoe.graft.merging import Trim
    from pdmoe.graft.planner import Piece

_INSTRUCT = -1  # the expert slot of INSTRUCT's unit, which serves every expert


@register
class Ties(TaskVectorMerge):
    method = MergeMethod.TIES
    summary = (
        "TIES (Yadav et al. 2023): keeps the DENSITY largest magnitudes of each task vector, elects the sign "
        "of their weighted sum and takes the weighted mean of the agreeing entries"
    )

    def check_options(self, spec: MergeSpec) -> None:
        require_density(spec, "e.g. 0.2")

    def describe(self, spec: MergeSpec) -> str:
        return f"method {spec.method.value}, density {spec.density:g}"

    def check_weights(self, weights: Sequence[float]) -> None:
        # the mean divides by the summed weights of the agreeing task vectors
        if any(w <= 0 for w in weights):
            raise UsageError(
                "{method} needs positive weights ({scale} > 0), got {weights}",
                problem=Problem.INVALID,
                method=Option("method", self.method.value),
                scale=Option("scale"),
                weights=list(weights),
            )

    def merge_deltas(
        self, spec: MergeSpec, deltas: Sequence[torch.Tensor], weights: Sequence[float], units: Sequence[str]
    ) -> torch.Tensor:
        from pdmoe.graft.merging import Trim, magnitude_threshold, masked, ties_merge

        trimmed = []
        for delta in deltas:
            flat = delta.reshape(-1)
            threshold = magnitude_threshold(lambda flat=flat: [flat], flat.numel(), spec.density)
            trimmed.append(masked(delta, Trim(threshold).mask(delta)))
        return ties_merge(trimmed, weights)

    def prepare(self, tensor: MergedTensor) -> dict[tuple[int, int], Trim]:
        """The trim of every unit: (expert, or ``_INSTRUCT``; piece index) -> ``Trim``."""
        from pdmoe.graft.merging import Trim, magnitude_threshold
        from pdmoe.graft.planner import Role

        trims = {}
        for index, piece in enumerate(tensor.pieces):
            numel = (piece.stop - piece.start) * tensor.plan.width
            units = [(Role.INSTRUCT, _INSTRUCT)] + [(Role.CPT, e) for e in range(max(tensor.plan.experts, 1))]
            for role, expert in units:
                blocks = tensor.unit_blocks(role, max(expert, 0), piece)
                trims[(expert, index)] = Trim(magnitude_threshold(blocks, numel, tensor.spec.density))
        return trims

    def instruct_vector(
        self, tensor: MergedTensor, piece: Piece, piece_index: int, first: int, instruct: torch.Tensor
    ) -> torch.Tensor:
        from pdmoe.graft.merging import masked

        return masked(instruct, tensor.state[(_INSTRUCT, piece_index)].mask(instruct))

    def merge_block(
        self,
        tensor: MergedTensor,
        expert: int,
        piece: Piece,
        piece_index: int,
        first: int,
        cpt: torch.Tensor,
        instruct: torch.Tensor,
    ) -> torch.Tensor:
        from pdmoe.graft.merging import masked, ties_merge

        cpt = masked(cpt, tensor.state[(expert, piece_index)].mask(cpt))
        return ties_merge([cpt, instruct], tensor.weights)
