"""The options of ``pdmoe cpt`` and ``pdmoe eval``, their defaults and their checks, with no torch:
the command line builds its parsers and refuses bad options from here before torch, transformers
and accelerate load.

Each option's field carries what the code needs to know about it (``rules``): the range a number
must lie in, and whether a resumed run may change it. Adding an option is one field here (plus its
``--flag`` in ``cli``); validation and the resume settings follow from the field.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, Field, asdict, dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any

from pdmoe.errors import Option, Problem, UsageError

DEFAULT_SEQ_LEN = 1024  # the method's; shorter when the model's maximum is
DEFAULT_LPR_COEF = 0.02  # on -log p0: MoE-LPR's 0.1 on its weaker form near p0 = 0.2 (see losses)


def sequence_length(requested: int | None, max_positions: int | None) -> int:
    """The packed sequence length of cpt and eval: ``requested``, or by default the method's
    ``DEFAULT_SEQ_LEN`` capped at the model's ``max_positions`` (None: not known, nothing capped)."""
    if max_positions is None:
        return DEFAULT_SEQ_LEN if requested is None else requested
    if requested is None:
        return min(DEFAULT_SEQ_LEN, max_positions)
    if requested > max_positions:
        raise UsageError(
            "{option} {seq_len} is larger than the model's maximum ({max_positions} positions)",
            problem=Problem.INVALID,
            option=Option("seq_len"),
            seq_len=requested,
            max_positions=max_positions,
        )
    return requested


class Stage(str, Enum):
    """What a run is for: CPT of the new experts, or the router-only review."""

    CPT = "cpt"
    REVIEW = "review"


class Part(str, Enum):
    """A group of parameters that trains or stays frozen as a whole (see ``freezing``)."""

    ROUTERS = "routers"
    NEW_EXPERTS = "new_experts"
    ORIGINAL_EXPERTS = "original_experts"
    NON_MOE = "non_moe"


PARTS = tuple(part.value for part in Part)
# How messages name each part.
PART_LABELS = {
    Part.ROUTERS: "the routers",
    Part.NEW_EXPERTS: "the new experts",
    Part.ORIGINAL_EXPERTS: "the original experts",
    Part.NON_MOE: "the non-MoE weights",
}


def describe_parts(parts: tuple[Part, ...]) -> str:
    """``(ROUTERS, NEW_EXPERTS)`` as "the routers and the new experts"."""
    labels = [PART_LABELS[Part(part)] for part in parts]
    return labels[0] if len(labels) == 1 else f"{', '.join(labels[:-1])} and {labels[-1]}"


class Resume(Enum):
    """What an option is to a resumed run."""

    FIXED = "fixed"  # it shapes the trajectory: saved in the checkpoint, a resumed run must keep it
    FREE = "free"  # it does not (where to write, how often to log...): a resumed run may change it


_MAX_INTEGER = 2**63 - 1


@dataclass(frozen=True)
class WholeNumber:
    """An int (not a bool) from ``minimum`` to 2**63-1."""

    minimum: int

    def check(self, option: str, value: Any) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or not self.minimum <= value <= _MAX_INTEGER:
            raise UsageError(
                "{option} must be a whole number from {minimum} to 2**63-1, got {value!r}",
                problem=Problem.INVALID,
                option=Option(option),
                minimum=self.minimum,
                value=value,
            )


@dataclass(frozen=True)
class FiniteNumber:
    """A finite int or float (not a bool) above ``bound`` (or at it, when ``inclusive``), at most ``maximum``."""

    bound: float
    inclusive: bool
    maximum: float = math.inf

    def check(self, option: str, value: Any) -> None:
        in_range = (
            isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
            and (value >= self.bound if self.inclusive else value > self.bound)
        )
        if not in_range:
            bound = f">= {self.bound:g}" if self.inclusive else f"> {self.bound:g}"
            raise UsageError(
                "{option} must be a finite number {bound}, got {value!r}",
                problem=Problem.INVALID,
                option=Option(option),
                bound=bound,
                value=value,
            )
        if value > self.maximum:
            raise UsageError(
                "{option} must be at most {maximum:g}, got {value!r}",
                problem=Problem.INVALID,
                option=Option(option),
                maximum=self.maximum,
                value=value,
            )


Check = WholeNumber | FiniteNumber
_CHECK, _RESUME = "check", "resume"


def rules(check: Check | None = None, resume: Resume = Resume.FIXED) -> dict[str, Any]:
    """The metadata of a ``TrainConfig`` field: ``check``, the range of a number (None passes when the
    default is None); ``resume``, FREE when a resumed run may change it. A plain field is FIXED and unchecked.

    A new FIXED option needs a default that does what runs did before it existed: a checkpoint
    written before it holds no value for it, and resumes when the run keeps that default."""
    return {_CHECK: check, _RESUME: resume}


@dataclass(frozen=True)
class EvalOptions:
    """How ``pdmoe eval`` (``evaluate.evaluate_model``) evaluates; its flags' defaults read from here."""

    seq_len: int | None = None  # None: min(DEFAULT_SEQ_LEN, the model's maximum)
    batch_size: int = 8  # sequences per forward pass
    max_sequences: int | None = 256  # spread evenly over the data; None: all
    cache_dir: str | Path | None = None  # of tokenised corpora; None: ``data.default_cache_dir()``


DEFAULT_EVAL_OPTIONS = EvalOptions()


@dataclass(frozen=True)
class TrainConfig:
    """Every option of ``pdmoe cpt`` (CLI names are these with dashes); defaults follow docs/method.md.

    ``seq_len=None`` is ``DEFAULT_SEQ_LEN``, or the model's maximum when that is smaller.
    """

    model: str | Path
    data: list[str | Path]
    out: str | Path = field(metadata=rules(resume=Resume.FREE))
    stage: Stage | str = Stage.CPT
    original_langs: list[str] = field(default_factory=list)
    new_langs: list[str] = field(default_factory=list)
    langs: list[str] | None = None
    data_format: str = "auto"
    text_field: str = "text"
    lang_field: str = "lang"
    cache_dir: str | Path | None = field(default=None, metadata=rules(resume=Resume.FREE))
    seq_len: int | None = field(default=None, metadata=rules(WholeNumber(1)))
    micro_batch_size: int = field(default=4, metadata=rules(WholeNumber(1)))
    grad_accum: int = field(default=1, metadata=rules(WholeNumber(1)))
    # 0 steps would write the untrained model as a "trained" one
    max_steps: int | None = field(default=None, metadata=rules(WholeNumber(1)))
    max_tokens: int | None = field(default=None, metadata=rules(WholeNumber(1)))
    lr: float = field(default=5e-5, metadata=rules(FiniteNumber(0.0, inclusive=False)))
    warmup_steps: int | None = field(default=None, metadata=rules(WholeNumber(0)))
    min_lr_ratio: float = field(default=0.1, metadata=rules(FiniteNumber(0.0, inclusive=True, maximum=1.0)))
    weight_decay: float = field(default=0.0, metadata=rules(FiniteNumber(0.0, inclusive=True)))
    max_grad_norm: float = field(default=1.0, metadata=rules(FiniteNumber(0.0, inclusive=True)))
    seed: int = field(default=0, metadata=rules(WholeNumber(0)))
    bf16: str = "auto"
    gradient_checkpointing: bool = field(default=False, metadata=rules(resume=Resume.FREE))
    aux_loss_coef: float | None = field(default=None, metadata=rules(FiniteNumber(0.0, inclusive=True)))
    lpr_coef: float = field(default=DEFAULT_LPR_COEF, metadata=rules(FiniteNumber(0.0, inclusive=True)))
    trainable: str | None = None
    save_every: int = field(default=500, metadata=rules(WholeNumber(1), resume=Resume.FREE))
    keep_checkpoints: int = field(default=2, metadata=rules(WholeNumber(0), resume=Resume.FREE))
    resume: str | Path | None = field(default=None, metadata=rules(resume=Resume.FREE))
    eval_data: list[str | Path] = field(default_factory=list, metadata=rules(resume=Resume.FREE))
    eval_langs: list[str] | None = field(default=None, metadata=rules(resume=Resume.FREE))
    eval_every: int = field(default=0, metadata=rules(WholeNumber(0), resume=Resume.FREE))
    eval_max_sequences: int = field(default=64, metadata=rules(WholeNumber(1), resume=Resume.FREE))
    log_every: int = field(default=10, metadata=rules(WholeNumber(1), resume=Resume.FREE))
    overwrite: bool = field(default=False, metadata=rules(resume=Resume.FREE))
    progress: bool = field(default=True, metadata=rules(resume=Resume.FREE))
    # e.g. "80GB"; None: the GPU's own (no check off GPUs)
    gpu_memory: str | int | None = field(default=None, metadata=rules(resume=Resume.FREE))


def check_options(config: TrainConfig) -> None:
    """Every numeric option an int or a finite float in its field's range (NaN, infinities and bools
    are refused), and no two options that exclude each other."""
    for spec in fields(config):
        check, value = spec.metadata.get(_CHECK), getattr(config, spec.name)
        if check is not None and not (value is None and spec.default is None):
            check.check(spec.name, value)
    if config.max_steps is not None and config.max_tokens is not None:
        raise UsageError(
            "give {max_steps} or {max_tokens}, not both",
            problem=Problem.CONFLICT,
            max_steps=Option("max_steps"),
            max_tokens=Option("max_tokens"),
        )


def fixed_settings(config: TrainConfig) -> dict[str, Any]:
    """The FIXED options of ``config``, as JSON values: what a resumed run must share with its checkpoint."""
    values = asdict(config)
    return as_json({spec.name: values[spec.name] for spec in fields(config) if _is_fixed(spec)})


def fixed_defaults() -> dict[str, Any]:
    """The default of every FIXED option that has one, as JSON values: what a checkpoint written
    before the option existed ran with."""
    defaults = {
        spec.name: spec.default if spec.default_factory is MISSING else spec.default_factory()
        for spec in fields(TrainConfig)
        if _is_fixed(spec) and (spec.default is not MISSING or spec.default_factory is not MISSING)
    }
    return as_json(defaults)


def free_options() -> frozenset[str]:
    """The options a resumed run may change (never in a checkpoint's settings)."""
    return frozenset(spec.name for spec in fields(TrainConfig) if not _is_fixed(spec))


def as_json(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as they read back from a checkpoint's JSON (paths as strings, enums as values)."""
    return json.loads(json.dumps(settings, default=str))


def _is_fixed(spec: Field) -> bool:
    return spec.metadata.get(_RESUME, Resume.FIXED) is Resume.FIXED
