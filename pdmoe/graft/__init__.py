"""``pdmoe graft``: add the post-training delta, expanded to the MoE shape, to the CPT model.

    out = CPT + ALPHA * (INSTRUCT - BASE)        (docs/method.md, step 4; ``--method task-arithmetic``)

or, as data-free merging baselines, TIES or DARE of the two task vectors CPT − BASE and
ALPHA-weighted INSTRUCT − BASE (``methods``: one registered strategy per method, its math in
``merging``). The plan (``planner``) is built and checked from headers alone, the math
(``delta``, ``merging``) is kept apart from the streaming I/O (``runner``, ``merge_stream``); see ``planner`` for the vocabulary and tied-embedding rules and ``runner`` for
the side files, resume and the ``graft.json`` manifest.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdmoe.graft.methods import MergeMethod, MergeSpec
from pdmoe.hub import resolve_model
from pdmoe.io.outputs import Command, claim_output
from pdmoe.options import check_number, parse_dtype, parse_size

if TYPE_CHECKING:
    import torch

    from pdmoe.graft.planner import GraftPlan
    from pdmoe.graft.runner import GraftReport

__all__ = ["GraftPlan", "GraftReport", "MergeMethod", "graft"]
# Loaded on first use: ``pdmoe graft`` checks its options and paths before torch loads.
_LAZY = {"GraftPlan": "pdmoe.graft.planner", "GraftReport": "pdmoe.graft.runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdmoe.graft' has no attribute {name!r}")


def graft(
    base: str | Path,
    instruct: str | Path,
    cpt: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    method: MergeMethod | str = MergeMethod.TASK_ARITHMETIC,
    density: float | None = None,
    seed: int = 0,
    skip_embeddings: bool = False,
    dtype: str | torch.dtype | None = None,
    shard_size: str | int = "5GB",
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
    allow_modified_base: bool = False,
    allow_non_finite: bool = False,
) -> GraftReport:
    """Graft ``scale * (instruct - base)`` onto ``cpt`` and write the result to ``out``.

    ``method`` ties / dare merge the task vectors (cpt - base, instruct - base) with weights
    (1, scale) instead, keeping ``density`` of each (``seed`` draws DARE's masks).
    Everything is checked (inputs, output directory, free space) before the first byte is
    written; ``dry_run`` stops after planning and writes nothing. While streaming, NaN / inf values
    (in the inputs, or from an overflowing sum) are refused unless ``allow_non_finite``, and for an
    MoE CPT the tensors pdmoe's CPT leaves untouched must equal BASE's unless ``allow_modified_base``.
    """
    check_number("--scale", scale)
    base, instruct, cpt = resolve_model(base), resolve_model(instruct), resolve_model(cpt)
    merge = MergeSpec(MergeMethod.parse(method), density, seed)
    merge.check_weights((1.0, scale))
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size)
    out_dir = Path(out)
    from pdmoe.graft.planner import build_plan
    from pdmoe.graft.runner import GraftOptions, GraftReport, execute
    from pdmoe.io.reader import CheckpointReader

    with CheckpointReader(base) as b, CheckpointReader(instruct) as i, CheckpointReader(cpt) as c:
        plan = build_plan(
            b,
            i,
            c,
            alpha=scale,
            merge=merge,
            skip_embeddings=skip_embeddings,
            dtype=out_dtype,
            shard_bytes=shard_bytes,
        )
        if dry_run:
            return GraftReport(out_dir=out_dir, plan=plan, dry_run=True)
        options = GraftOptions(
            scale=scale,
            method=merge.method.value,
            density=density,
            seed=seed,
            skip_embeddings=skip_embeddings,
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            shard_size=shard_bytes,
            resume=resume,
            overwrite=overwrite,
            allow_modified_base=allow_modified_base,
            allow_non_finite=allow_non_finite,
        )
        with claim_output(
            out_dir,
            Command.GRAFT,
            inputs=(b.directory, i.directory, c.directory),
            overwrite=overwrite,
            resume=resume,
            settings=asdict(options),
            keep_partial=True,
        ) as folder:
            return execute(plan, b, i, c, folder, options=options)
