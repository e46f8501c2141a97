"""The registry of merge methods (``pdmoe graft --method``), in the style of mergekit's.

Each method is a ``MergeStrategy`` in a module of its own, registered with ``@register``: it checks
its options, describes itself and does its own arithmetic, so nothing outside a method's module
asks which method runs. This module and the method modules load without torch (the command line
refuses bad options before torch loads); a strategy imports the torch code it needs (``merging``,
``delta``) when it computes.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import astuple, dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pdmoe.errors import Option, Problem, UsageError
from pdmoe.options import check_seed

if TYPE_CHECKING:
    import torch

    from pdmoe.graft.merge_stream import MergedTensor, Span
    from pdmoe.graft.planner import Piece, TensorPlan
    from pdmoe.graft.runner import Streamer


class MergeMethod(enum.Enum):
    """How the CPT and INSTRUCT task vectors are combined (``pdmoe graft --method``); each member
    has one registered ``MergeStrategy``."""

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
    """A merge method with its options: ``density`` (TIES keep fraction, DARE keep rate), ``seed`` (DARE).

    Every field is part of the graft's resume fingerprint (``fingerprint_fields``): a new option
    added here invalidates the shards of runs that did not have it.
    """

    method: MergeMethod = MergeMethod.TASK_ARITHMETIC
    density: float | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        check_seed(self.seed)
        self.strategy.check_options(self)

    @property
    def strategy(self) -> MergeStrategy:
        return strategy(self.method)

    def describe(self) -> str:
        return self.strategy.describe(self)

    def check_weights(self, weights: Sequence[float]) -> None:
        self.strategy.check_weights(weights)

    def fingerprint_fields(self) -> list[Any]:
        """Every field's value in declaration order, enums by value (JSON-ready)."""
        return [value.value if isinstance(value, enum.Enum) else value for value in astuple(self)]


class MergeStrategy(ABC):
    """One merge method: its options, its description and its arithmetic (in memory and streamed)."""

    method: ClassVar[MergeMethod]
    summary: ClassVar[str]  # what it computes, for ``pdmoe graft --help``

    @abstractmethod
    def check_options(self, spec: MergeSpec) -> None:
        """Refuse (``UsageError``) options this method lacks or does not take."""

    @abstractmethod
    def describe(self, spec: MergeSpec) -> str:
        """The method and its options, for the plan and ``graft.json``."""

    def check_weights(self, weights: Sequence[float]) -> None:
        """Refuse task-vector weights the method cannot combine (any by default)."""
        return None

    @abstractmethod
    def merge_deltas(
        self, spec: MergeSpec, deltas: Sequence[torch.Tensor], weights: Sequence[float], units: Sequence[str]
    ) -> torch.Tensor:
        """The merged delta of whole units held in memory (``units[t]`` names τ_t's unit)."""

    @abstractmethod
    def stream(self, streamer: Streamer, plan: TensorPlan, spans: list[Span]) -> Iterator[torch.Tensor]:
        """The output blocks of a tensor plan with delta pieces, in file order, from ``streamer``."""


class TaskVectorMerge(MergeStrategy):
    """A method that merges the task vectors τ_CPT, τ_INSTRUCT per unit into OUT = BASE + merged,
    streamed by ``merge_stream.MergedTensor`` through the hooks below."""

    def stream(self, streamer: Streamer, plan: TensorPlan, spans: list[Span]) -> Iterator[torch.Tensor]:
        return streamer.merged_blocks(plan, spans, self)

    def prepare(self, tensor: MergedTensor) -> Any:
        """Per-tensor state found before the first block (e.g. TIES's thresholds); None by default."""
        return None

    @abstractmethod
    def instruct_vector(
        self, tensor: MergedTensor, piece: Piece, piece_index: int, first: int, instruct: torch.Tensor
    ) -> torch.Tensor:
        """INSTRUCT's task vector on rows from ``first`` of ``piece``, processed once for every expert."""

    @abstractmethod
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
        """The merged delta of ``expert``'s rows from ``first`` of ``piece`` (``cpt`` is its raw task
        vector, ``instruct`` the processed one)."""


def require_density(spec: MergeSpec, example: str) -> None:
    """A method that keeps a fraction of each task vector: ``density`` given, in (0, 1]."""
    if spec.density is None:
        raise UsageError(
            "{method} needs {density}, the fraction of each task vector kept ({example})",
            problem=Problem.MISSING,
            method=Option("method", spec.method.value),
            density=Option("density"),
            example=example,
        )
    if not 0 < spec.density <= 1:
        raise UsageError(
            "{density} must be in (0, 1], got {value}",
            problem=Problem.INVALID,
            density=Option("density"),
            value=spec.density,
        )


_STRATEGIES: dict[MergeMethod, MergeStrategy] = {}


def register(cls: type[MergeStrategy]) -> type[MergeStrategy]:
    """Class decorator: make ``cls`` the strategy of ``cls.method``."""
    if cls.method in _STRATEGIES:
        raise RuntimeError(f"merge method {cls.method.value} is registered twice")
    _STRATEGIES[cls.method] = cls()
    return cls


def strategy(method: MergeMethod) -> MergeStrategy:
    """The registered strategy of ``method``; a method without one is a programming error, never a
    silent fallback to another method."""
    try:
        return _STRATEGIES[method]
    except KeyError:
        raise LookupError(f"merge method {method.value} has no registered strategy") from None


def check_registry() -> None:
    """Every ``MergeMethod`` has a strategy (run when ``pdmoe.graft.methods`` loads)."""
    missing = [method.value for method in MergeMethod if method not in _STRATEGIES]
    if missing:
        raise LookupError(f"merge methods without a registered strategy: {', '.join(missing)}")
