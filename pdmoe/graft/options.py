"""The options of a graft, written once: ``pdmoe graft`` builds them from its flags (its defaults
and help defaults read from here), a Python caller passes them to ``pdmoe.graft.graft`` whole.

No torch at import: the command line reads these defaults before torch loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pdmoe.graft.methods import MergeMethod
from pdmoe.options import DEFAULT_SHARD_SIZE

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class GraftOptions:
    """How to graft. ``graft.json`` records them as ``graft`` resolved them (the method's name, the
    dtype's name, the shard size in bytes); ``--resume`` reuses shards only of the same plan."""

    scale: float = 1.0  # SCALE in OUT = CPT + SCALE * (INSTRUCT - BASE); docs/method.md's α
    method: MergeMethod | str = MergeMethod.TASK_ARITHMETIC
    density: float | None = None  # fraction of each task vector kept, for the methods that take it
    seed: int = 0  # of the random masks, for the methods that draw them
    skip_embeddings: bool = False  # embed_tokens / lm_head keep their CPT values
    dtype: str | torch.dtype | None = None  # None: each CPT tensor's own
    shard_size: str | int = DEFAULT_SHARD_SIZE
    resume: bool = False
    overwrite: bool = False
    allow_modified_base: bool = False  # CPT's shared weights / original experts may differ from BASE's
    allow_non_finite: bool = False  # write NaN / inf values instead of refusing them


DEFAULT_OPTIONS = GraftOptions()
