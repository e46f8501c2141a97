"""The ``pdmoe export`` subcommand."""

from __future__ import annotations

import argparse

from pdmoe.cli import options_from_args
from pdmoe.export import DEFAULT_OPTIONS, ExportOptions
from pdmoe.export.formats import ExpertLayout, NativeFormat
from pdmoe.io.outputs import Command, check_output
from pdmoe.preflight import check_models

_DESCRIPTION = """\
Write a pdmoe MoE (from upcycle, cpt or graft) as a native transformers checkpoint that loads
without pdmoe: Llama/Mistral with every layer MoE -> Mixtral; Qwen3 -> Qwen3-MoE; Qwen2, or
Llama/Mistral with dense layers -> Qwen2-MoE (a shared expert that adds exactly 0). Logits are
identical to pdmoe's in float32. A format that is not exact for the model is refused with the
reason and one that is; auto takes the exact one the most serving stacks run exactly, and says
which stacks do not (README: "Compatibility")."""


def add_layout_argument(parser: argparse.ArgumentParser, flag: str = "--layout") -> None:
    """The expert layout option (``ExportOptions.layout``), shared with ``pdmoe graft --export``."""
    parser.add_argument(
        flag,
        dest="layout",
        choices=[layout.value for layout in ExpertLayout],
        default=ExpertLayout(DEFAULT_OPTIONS.layout).value,
        help="per-expert: one tensor per expert, as the hub's Mixtral/Qwen MoE checkpoints (what vLLM, "
        "llama.cpp and transformers 4.x read; data copied unchanged); fused: pdmoe's fused tensors hard-linked, "
        "no extra disk (transformers >= 5). Default: %(default)s",
    )


def add_export_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "export",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model", required=True, help="pdmoe MoE checkpoint: folder or hub id ORG/NAME[@REV]"
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument(
        "--format",
        choices=[fmt.value for fmt in NativeFormat],
        default=NativeFormat(DEFAULT_OPTIONS.format).value,
        help="native class; auto: the model family's own MoE (default: %(default)s)",
    )
    add_layout_argument(parser)
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=run_export_command)
    return parser


def run_export_command(args: argparse.Namespace) -> int:
    options = options_from_args(ExportOptions, args)
    inputs = check_models([args.model])
    check_output(args.out, Command.EXPORT, inputs=inputs, overwrite=options.overwrite)
    from pdmoe.export import export

    report = export(args.model, args.out, options)
    print(report.summary())
    return 0
