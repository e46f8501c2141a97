"""Task arithmetic (Ilharco et al. 2023), the graft itself: OUT = CPT + SCALE * (INSTRUCT - BASE),
that is Σ_t w_t τ_t on BASE with weights (1, SCALE)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.graft.methods.registry import MergeMethod, MergeSpec, MergeStrategy, register

if TYPE_CHECKING:
    import torch

    from pdmoe.graft.merge_stream import Span
    from pdmoe.graft.planner import TensorPlan
    from pdmoe.graft.runner import Streamer


@register
class TaskArithmetic(MergeStrategy):
    method = MergeMethod.TASK_ARITHMETIC
    summary = "the graft: OUT = CPT + SCALE * (INSTRUCT - BASE) (default)"

    def check_options(self, spec: MergeSpec) -> None:
        if spec.density is not None:
            raise UsageError(
                "{density} does not apply to {method}: it keeps all of each task vector",
                problem=Problem.CONFLICT,
                density=Option("density"),
                method=Option("method", self.method.value),
            )

    def describe(self, spec: MergeSpec) -> str:
        return f"method {spec.method.value}"

    def merge_deltas(
        self, spec: MergeSpec, deltas: Sequence[torch.Tensor], weights: Sequence[float], units: Sequence[str]
    ) -> torch.Tensor:
        from pdmoe.graft.merging import task_arithmetic

        return task_arithmetic(deltas, weights)

    def stream(self, streamer: Streamer, plan: TensorPlan, spans: list[Span]) -> Iterator[torch.Tensor]:
        # CPT + SCALE * delta: the delta is the same for every expert, computed once and kept
        return streamer.delta_blocks(plan, spans)
