"""The ``pdmoe upcycle`` subcommand."""

from __future__ import annotations

import argparse

from pdmoe.families import FAMILY_TITLES
from pdmoe.io.outputs import Command, check_output
from pdmoe.options import DEFAULT_SHARD_SIZE, DTYPE_NAMES
from pdmoe.preflight import check_models


def _run_upcycle(args: argparse.Namespace) -> int:
    check_output(args.out, Command.UPCYCLE, inputs=check_models([args.model]), overwrite=args.overwrite)
    from pdmoe.upcycle import upcycle

    out = upcycle(
        args.model,
        args.out,
        num_experts=args.num_experts,
        top_k=args.top_k,
        layers=args.layers,
        router_init_std=args.router_init_std,
        seed=args.seed,
        dtype=args.dtype,
        shard_size=args.shard_size,
        overwrite=args.overwrite,
        allow_non_finite=args.allow_non_finite,
    )
    print(f"upcycled {args.model} -> {out} ({args.num_experts} experts, top-{args.top_k})")
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
    parser.add_argument("--num-experts", type=int, default=4, help="experts per MoE layer (default 4)")
    parser.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    parser.add_argument(
        "--layers",
        default="all",
        help="MoE layers: 'all' (default), a list like '0,2,5', or 'every:N' (0, N, 2N, ...)",
    )
    parser.add_argument(
        "--router-init-std",
        type=float,
        default=None,
        help="std of the N(0, std) router init (default: the dense config's initializer_range, 0.02)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the router init (default 0)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPE_NAMES), default=None, help="output dtype (default: keep the input's)"
    )
    parser.add_argument(
        "--shard-size", default=DEFAULT_SHARD_SIZE, help="maximum shard size (default: %(default)s)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="copy NaN / inf weights as they are instead of refusing them",
    )
    parser.set_defaults(func=_run_upcycle)
