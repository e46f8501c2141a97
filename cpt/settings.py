"""The options of ``pdmoe cpt`` and their defaults, with no torch: the command line builds its
parser (and refuses bad options) from here before torch, transformers and accelerate load."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

DEFAULT_SEQ_LEN = 1024  # the method's; shorter when the model's maximum is
DEFAULT_LPR_COEF = 0.02  # on -log p0: MoE-LPR's 0.1 on its weaker form near p0 = 0.2 (see losses)


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


@dataclass
class TrainConfig:
    """Every option of ``pdmoe cpt`` (CLI names are these with dashes); defaults follow docs/method.md.

    ``seq_len=None`` is ``DEFAULT_SEQ_LEN``, or the model's maximum when that is smaller.
    """

    model: str | Path
    data: list[str | Path]
    out: str | Path
    stage: Stage | str = Stage.CPT
    original_langs: list[str] = field(default_factory=list)
    new_langs: list[str] = field(default_factory=list)
    langs: list[str] | None = None
    data_format: str = "auto"
    text_field: str = "text"
    lang_field: str = "lang"
    cache_dir: str | Path | None = None
    seq_len: int | None = None
    micro_batch_size: int = 4
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    lr: float = 5e-5
    warmup_steps: int | None = None
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    bf16: str = "auto"
    gradient_checkpointing: bool = False
    aux_loss_coef: float | None = None
    lpr_coef: float = DEFAULT_LPR_COEF
    trainable: str | None = None
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: str | Path | None = None
    eval_data: list[str | Path] = field(default_factory=list)
    eval_langs: list[str] | None = None
    eval_every: int = 0
    eval_max_sequences: int = 64
    log_every: int = 10
    overwrite: bool = False
    progress: bool = True
    gpu_memory: str | int | None = None  # e.g. "80GB"; None: the GPU's own (no check off GPUs)
