"""The ``pdmoe upcycle`` subcommand."""

from __future__ import annotations

import argparse

from pdmoe.cli import options_from_args
from pdmoe.families import FAMILY_TITLES
from pdmoe.io.outputs import Command, check_output
from pdmoe.options import DTYPE_NAMES
from pdmoe.preflight import check_models
from pdmoe.upcycle_options import DEFAULT_OPTIONS, UpcycleOptions


def _run_upcycle(args: argparse.Namespace) -> int:
    options = options_from_args(UpcycleOptions, args)
    check_output(args.out, Command.UPCYCLE, inputs=check_models([args.model]), overwrite=options.overwrite)
    from pdmoe.upcycle import upcycle

    out = upcycle(args.model, args.out, options)
    print(f"upcycled {args.model} -> {out} ({options.num_experts} experts, top-{options.top_k})")
    return 0


def add_upcycle_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        description=f"Stream a dense {FAMILY_TITLES} safetensors checkpoint into the MoE format.",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="dense checkpoint (safetensors): a folder, or a Hugging Face Hub id ORG/NAME[@REVISION]",
    )
    parser.add_argument("--out", required=True, help="output directory for the MoE checkpoint")
    parser.add_argument(
        "--num-experts",
        type=int,
        default=DEFAULT_OPTIONS.num_experts,
        help="experts per MoE layer (default %(default)s)",
    )
    parser.add_argument(
        "--top-k", type=int, default=DEFAULT_OPTIONS.top_k, help="experts per token (default %(default)s)"
    )
    parser.add_argument(
        "--layers",
        default=DEFAULT_OPTIONS.layers,
        help="MoE layers: 'all', a list like '0,2,5', or 'every:N' (0, N, 2N, ...) (default: %(default)s)",
    )
    parser.add_argument(
        "--router-init-std",
        type=float,
        default=DEFAULT_OPTIONS.router_init_std,
        help="std of the N(0, std) router init (default: the dense config's initializer_range, 0.02)",
    )
    parser.add_argument(
        "--seed", type=int, default=DEFAULT_OPTIONS.seed, help="seed of the router init (default %(default)s)"
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPE_NAMES),
        default=DEFAULT_OPTIONS.dtype,
        help="output dtype (default: keep the input's)",
    )
    parser.add_argument(
        "--shard-size", default=DEFAULT_OPTIONS.shard_size, help="maximum shard size (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="copy NaN / inf weights as they are instead of refusing them",
    )
    parser.set_defaults(func=_run_upcycle)
