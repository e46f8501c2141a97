"""The ``pdmoe graft`` subcommand."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from pdmoe.cli import options_from_args
from pdmoe.cli.export import add_layout_argument
from pdmoe.errors import UsageError
from pdmoe.export import ExportOptions
from pdmoe.export.formats import NativeFormat
from pdmoe.graft.methods import MergeMethod, strategy
from pdmoe.graft.options import DEFAULT_OPTIONS, GraftOptions
from pdmoe.io.outputs import Command, Output, check_outputs
from pdmoe.options import DTYPE_NAMES
from pdmoe.preflight import check_models

_DESCRIPTION = """\
Add the post-training delta to the CPT model: OUT = CPT + SCALE * (INSTRUCT - BASE).
BASE and INSTRUCT are dense checkpoints of the same architecture; CPT is the upcycled MoE after
continued pre-training (every expert gets its layer's dense FFN delta, routers keep CPT's values)
or a dense CPT model (classic ParamDelta / chat vector). Streams tensor by tensor in bounded memory.
Vocabulary: BASE's rows get the delta; rows CPT added keep CPT's values (the tokenizer then comes
from CPT, the chat template from INSTRUCT); rows INSTRUCT added keep INSTRUCT's values.

Merge methods (--method): task-arithmetic is the graft above; the others are data-free merging
baselines that combine the task vectors CPT - BASE (weight 1) and INSTRUCT - BASE (weight SCALE)
per tensor, and per expert in an MoE layer (each expert's W_e - W_ffn,BASE with the layer's dense
FFN delta), into OUT = BASE + the merged delta:
"""


def _methods_help() -> str:
    """One entry per registered merge method, from its strategy."""
    return "\n".join(
        textwrap.fill(
            strategy(method).summary,
            width=100,
            initial_indent=f"  {method.value:<17}",
            subsequent_indent=" " * 19,
        )
        for method in MergeMethod
    )


def add_graft_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``graft``; the handler is stored as ``func`` (``args.func(args)`` returns the exit code)."""
    parser = subparsers.add_parser(
        "graft",
        description=_DESCRIPTION + _methods_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--base", required=True, type=Path, help="dense base model: folder or hub id ORG/NAME[@REV]"
    )
    parser.add_argument(
        "--instruct", required=True, type=Path, help="dense post-trained model: folder or hub id"
    )
    parser.add_argument(
        "--cpt", required=True, type=Path, help="CPT model (upcycled MoE or dense): folder or hub id"
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument(
        "--scale", type=float, default=DEFAULT_OPTIONS.scale, help="SCALE above (default: %(default)s)"
    )
    parser.add_argument(
        "--method",
        choices=[m.value for m in MergeMethod],
        default=MergeMethod.parse(DEFAULT_OPTIONS.method).value,
        help="merge method (default: %(default)s; see above)",
    )
    parser.add_argument(
        "--density",
        type=float,
        default=DEFAULT_OPTIONS.density,
        help="fraction of each task vector kept, for the methods that take it (see above)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=DEFAULT_OPTIONS.seed,
        help="seed of the random masks, for the methods that draw them (default: %(default)s)",
    )
    parser.add_argument(
        "--skip-embeddings", action="store_true", help="leave embed_tokens / lm_head at their CPT values"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        default=DEFAULT_OPTIONS.dtype,
        help="output dtype (default: each CPT tensor's own)",
    )
    parser.add_argument(
        "--shard-size",
        default=DEFAULT_OPTIONS.shard_size,
        help="largest output shard, e.g. 5GB, 500MB (default: %(default)s)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan, write nothing")
    parser.add_argument("--resume", action="store_true", help="finish an interrupted graft into OUT")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT")
    parser.add_argument(
        "--allow-modified-base",
        action="store_true",
        help="graft a CPT that trained more than pdmoe's default (its shared weights or original "
        "experts differ from BASE's; refused otherwise, as a sign of the wrong BASE)",
    )
    parser.add_argument(
        "--allow-non-finite", action="store_true", help="write NaN / inf values instead of refusing them"
    )
    parser.add_argument(  # ExportOptions' format and layout keep their names: errors about them name these flags
        "--export",
        dest="format",
        choices=[fmt.value for fmt in NativeFormat],
        metavar="FORMAT",
        help="also write the result as a native transformers checkpoint (auto, mixtral, qwen2_moe, qwen3_moe; "
        "see pdmoe export), checked before the graft starts",
    )
    parser.add_argument("--export-out", type=Path, help="where --export writes (default: OUT-native)")
    add_layout_argument(parser, "--export-layout")
    parser.set_defaults(func=run_graft_command)
    return parser


def export_out(args: argparse.Namespace) -> Path:
    """Where ``--export`` writes: ``--export-out``, else OUT-native beside OUT (``--out .`` too)."""
    if args.export_out is not None:
        return args.export_out
    out = Path(os.path.abspath(args.out))
    return out.with_name(f"{out.name}-native")


def run_graft_command(args: argparse.Namespace) -> int:
    if args.export_out is not None and not args.format:
        raise UsageError("--export-out names where --export writes; pass --export FORMAT too, or drop it")
    options = options_from_args(GraftOptions, args)
    exporting = options_from_args(ExportOptions, args) if args.format else None
    inputs = check_models([args.base, args.instruct, args.cpt])
    if not args.dry_run:
        outputs = [Output(args.out, "out", Command.GRAFT)]
        if exporting:
            outputs.append(Output(export_out(args), "export_out", Command.EXPORT))
        # every output before the graft starts, clear of the inputs and of each other
        check_outputs(outputs, inputs=inputs, overwrite=options.overwrite, resume=options.resume)
    from pdmoe.export import check_export, export
    from pdmoe.graft import graft

    if exporting:
        check_export(args.cpt, exporting.format)
    report = graft(args.base, args.instruct, args.cpt, args.out, options, dry_run=args.dry_run)
    print(report.summary())
    if exporting and not args.dry_run:
        print(export(args.out, export_out(args), exporting).summary())
    return 0
