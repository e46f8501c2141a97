"""``pdmoe graft``: add the post-training delta, expanded to the MoE shape, to the CPT model.

    out = CPT + SCALE * (INSTRUCT - BASE)        (docs/method.md, step 4; ``--method task-arithmetic``)

or, as data-free merging baselines, TIES or DARE of the two task vectors CPT − BASE and
SCALE-weighted INSTRUCT − BASE (``methods``: one registered strategy per method, its math in
``merging``). The plan (``planner``) is built and checked from headers alone, the math
(``delta``, ``merging``) is kept apart from the streaming I/O (``runner``, ``merge_stream``); see ``planner`` for the vocabulary and tied-embedding rules and ``runner`` for
the side files, resume and the ``graft.json`` manifest.
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pdmoe.graft.methods import MergeMethod, MergeSpec
from pdmoe.graft.options import DEFAULT_OPTIONS, GraftOptions
from pdmoe.hub import resolve_model
from pdmoe.io.outputs import Command, claim_output
from pdmoe.options import check_number, parse_dtype, parse_size

if TYPE_CHECKING:
    from pdmoe.graft.planner import GraftPlan
    from pdmoe.graft.runner import GraftReport

__all__ = ["GraftOptions", "GraftPlan", "GraftReport", "MergeMethod", "graft"]
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
    options: GraftOptions = DEFAULT_OPTIONS,
    *,
    dry_run: bool = False,
    **changes: Any,
) -> GraftReport:
    """Graft ``options.scale * (instruct - base)`` onto ``cpt`` and write the result to ``out``;
    ``changes`` replace fields of ``options`` (``graft(base, instruct, cpt, out, scale=0.5)``).

    ``options.method`` ties / dare merge the task vectors (cpt - base, instruct - base) with weights
    (1, scale) instead, keeping ``density`` of each (``seed`` draws DARE's masks).
    Everything is checked (inputs, output directory, free space) before the first byte is
    written; ``dry_run`` (a mode, not an option of the output) stops after planning and writes
    nothing. While streaming, NaN / inf values (in the inputs, or from an overflowing sum) are
    refused unless ``allow_non_finite``, and for an MoE CPT the tensors pdmoe's CPT leaves
    untouched must equal BASE's unless ``allow_modified_base``.
    """
    options = replace(options, **changes)
    check_number("scale", options.scale)
    base, instruct, cpt = resolve_model(base), resolve_model(instruct), resolve_model(cpt)
    merge = MergeSpec(MergeMethod.parse(options.method), options.density, options.seed)
    merge.check_weights((1.0, options.scale))
    out_dtype = parse_dtype(options.dtype)
    shard_bytes = parse_size(options.shard_size)
    out_dir = Path(out)
    from pdmoe.graft.planner import build_plan
    from pdmoe.graft.runner import GraftReport, execute
    from pdmoe.io.reader import CheckpointReader

    with CheckpointReader(base) as b, CheckpointReader(instruct) as i, CheckpointReader(cpt) as c:
        plan = build_plan(
            b,
            i,
            c,
            scale=options.scale,
            merge=merge,
            skip_embeddings=options.skip_embeddings,
            dtype=out_dtype,
            shard_bytes=shard_bytes,
        )
        if dry_run:
            return GraftReport(out_dir=out_dir, plan=plan, dry_run=True)
        resolved = replace(
            options,
            method=merge.method.value,
            dtype=None if out_dtype is None else str(out_dtype).removeprefix("torch."),
            shard_size=shard_bytes,
        )
        with claim_output(
            out_dir,
            Command.GRAFT,
            inputs=(b.directory, i.directory, c.directory),
            overwrite=options.overwrite,
            resume=options.resume,
            settings=asdict(resolved),
            keep_partial=True,
        ) as folder:
            return execute(plan, b, i, c, folder, options=resolved)
