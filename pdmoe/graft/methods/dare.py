"""DARE (Yu et al. 2023): keep each task-vector entry with probability ``density``, rescale the
kept ones by 1/density, add (``merging``); the masks are drawn from ``seed`` and the unit's name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from pdmoe.graft.methods.registry import MergeMethod, MergeSpec, TaskVectorMerge, register, require_density

if TYPE_CHECKING:
    import torch

    from pdmoe.graft.merge_stream import MergedTensor
    from pdmoe.graft.planner import Piece


@register
class Dare(TaskVectorMerge):
    method = MergeMethod.DARE
    summary = (
        "DARE (Yu et al. 2023): keeps each entry with probability DENSITY (masks drawn from SEED) and "
        "rescales by 1/DENSITY"
    )

    def check_options(self, spec: MergeSpec) -> None:
        require_density(spec, "e.g. 0.5")

    def describe(self, spec: MergeSpec) -> str:
        return f"method {spec.method.value}, density {spec.density:g}, seed {spec.seed}"

    def merge_deltas(
        self, spec: MergeSpec, deltas: Sequence[torch.Tensor], weights: Sequence[float], units: Sequence[str]
    ) -> torch.Tensor:
        from pdmoe.graft.merging import dare_keep_mask, dare_merge

        masks = [
            dare_keep_mask(spec.seed, unit, 0, delta.numel(), spec.density).view(delta.shape)
            for delta, unit in zip(deltas, units, strict=True)
        ]
        return dare_merge(deltas, masks, weights, spec.density)

    def instruct_vector(
        self, tensor: MergedTensor, piece: Piece, piece_index: int, first: int, instruct: torch.Tensor
    ) -> torch.Tensor:
        from pdmoe.graft.merging import dare_keep_mask, masked
        from pdmoe.graft.planner import Role

        spec = tensor.spec
        unit = tensor.unit_name(Role.INSTRUCT, 0, piece)
        mask = dare_keep_mask(
            spec.seed, unit, tensor.dense_offset(piece, first), instruct.numel(), spec.density
        )
        return masked(instruct, mask)

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
        from pdmoe.graft.merging import dare_keep_mask, dare_merge
        from pdmoe.graft.planner import Role

        spec = tensor.spec
        offset = (first - piece.start) * tensor.plan.width
        unit = tensor.unit_name(Role.CPT, expert, piece)
        mask = dare_keep_mask(spec.seed, unit, offset, cpt.numel(), spec.density)
        everything = mask.new_ones(mask.shape)  # INSTRUCT's entries were dropped once, per piece
        return dare_merge([cpt, instruct], [mask, everything], tensor.weights, spec.density)
