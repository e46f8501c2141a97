"""``pdmoe graft``: add the post-training delta, expanded to the MoE shape, to the CPT model.

    out = CPT + ALPHA * (INSTRUCT - BASE)        (METHOD.md, step 4)

The plan (``planner``) is built and checked from headers alone, the math (``delta``) is kept
apart from the streaming I/O (``runner``); see ``planner`` for the vocabulary and tied-embedding
rules and ``runner`` for the side files, resume and the ``graft.json`` manifest.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from pdmoe.errors import UsageError
from pdmoe.graft.planner import GraftPlan, build_plan
from pdmoe.graft.runner import GraftOptions, GraftReport, execute
from pdmoe.io.outputs import prepare_output_dir
from pdmoe.io.reader import CheckpointReader
from pdmoe.options import parse_dtype, parse_size

__all__ = ["GraftPlan", "GraftReport", "graft"]


def graft(
    base: str | Path,
    instruct: str | Path,
    cpt: str | Path,
    out: str | Path,
    *,
    scale: float = 1.0,
    skip_embeddings: bool = False,
    dtype: str | torch.dtype | None = None,
    shard_size: str | int = "5GB",
    dry_run: bool = False,
    resume: bool = False,
    overwrite: bool = False,
) -> GraftReport:
    """Graft ``scale * (instruct - base)`` onto ``cpt`` and write the result to ``out``.

    Everything is checked (inputs, output directory, free space) before the first byte is
    written; ``dry_run`` stops after planning and writes nothing.
    """
    if resume and overwrite:
        raise UsageError("--resume continues what is in OUT and --overwrite deletes it; pass only one")
    if not math.isfinite(scale):
        raise UsageError(f"--scale must be a finite number, got {scale}")
    out_dtype = parse_dtype(dtype)
    shard_bytes = parse_size(shard_size)
    out_dir = Path(out)
    with CheckpointReader(base) as b, CheckpointReader(instruct) as i, CheckpointReader(cpt) as c:
        plan = build_plan(
            b, i, c, alpha=scale, skip_embeddings=skip_embeddings, dtype=out_dtype, shard_bytes=shard_bytes
        )
        if dry_run:
            return GraftReport(out_dir=out_dir, plan=plan, dry_run=True)
        prepare_output_dir(
            out_dir, overwrite=overwrite, resume=resume, inputs=(b.directory, i.directory, c.directory)
        )
        options = GraftOptions(
            scale=scale,
            skip_embeddings=skip_embeddings,
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            shard_size=shard_bytes,
            resume=resume,
            overwrite=overwrite,
        )
        return execute(plan, b, i, c, out_dir, options=options)
