"""The merge methods of ``pdmoe graft --method`` and their options, checked without torch (the
command line refuses bad options before torch loads); the arithmetic is ``merging``'s."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from pdmoe.errors import UsageError
from pdmoe.options import check_seed


class MergeMethod(enum.Enum):
    """How the CPT and INSTRUCT task vectors are combined (``pdmoe graft --method``)."""

    TASK_ARITHMETIC = "task-arithmetic"
    TIES = "ties"
    DARE = "dare"

    @classmethod
    def parse(cls, name: str | MergeMethod) -> MergeMethod:
        if isinstance(name, MergeMethod):
            return name
        try:
            return cls(name)
        except ValueError:
            choices = ", ".join(method.value for method in cls)
            raise UsageError(f"unknown merge method {name!r}; choose one of {choices}") from None


@dataclass(frozen=True)
class MergeSpec:
    """A merge method with its options: ``density`` (TIES keep fraction, DARE keep rate), ``seed`` (DARE)."""

    method: MergeMethod = MergeMethod.TASK_ARITHMETIC
    density: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_seed(self.seed)
        if self.method is MergeMethod.TASK_ARITHMETIC:
            if self.density is not None:
                raise UsageError("--density applies to --method ties or dare, not task-arithmetic")
            return
        if self.density is None:
            raise UsageError(
                f"--method {self.method.value} needs --density, the fraction of each task vector kept "
                "(e.g. 0.2 for TIES, 0.5 for DARE)"
            )
        if not 0 < self.density <= 1:
            raise UsageError(f"--density must be in (0, 1], got {self.density}")

    def describe(self) -> str:
        if self.method is MergeMethod.TASK_ARITHMETIC:
            return "method task-arithmetic"
        seed = f", seed {self.seed}" if self.method is MergeMethod.DARE else ""
        return f"method {self.method.value}, density {self.density:g}{seed}"


def check_weights(spec: MergeSpec, weights: Sequence[float]) -> None:
    """TIES divides by the summed weights of the agreeing task vectors: they must be positive."""
    if spec.method is MergeMethod.TIES and any(w <= 0 for w in weights):
        raise UsageError(f"--method ties needs positive weights (--scale > 0), got {list(weights)}")
