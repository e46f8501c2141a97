"""The ``pdmoe`` command: one subcommand per pipeline step, each registered by its own package."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from pdmoe.errors import PdmoeError
from pdmoe.options import DTYPES


def _run_upcycle(args: argparse.Namespace) -> int:
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
    )
    print(f"upcycled {args.model} -> {out} ({args.num_experts} experts, top-{args.top_k})")
    return 0


def add_upcycle_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "upcycle",
        help="turn a dense checkpoint into an MoE checkpoint (expert 0 = the dense FFN, the rest copies)",
        description="Stream a dense Llama/Mistral/Qwen2/Qwen3 safetensors checkpoint into the MoE format.",
    )
    parser.add_argument(
        "--model", required=True, help="dense Hugging Face checkpoint directory (safetensors)"
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
        "--dtype", choices=sorted(DTYPES), default=None, help="output dtype (default: keep the input's)"
    )
    parser.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.set_defaults(func=_run_upcycle)


def build_parser() -> argparse.ArgumentParser:
    from pdmoe.cpt.cli import add_cpt_parser, add_eval_parser
    from pdmoe.demo import add_demo_parser
    from pdmoe.graft.cli import add_graft_parser

    parser = argparse.ArgumentParser(
        prog="pdmoe",
        description="Language expansion without re-alignment: upcycle -> cpt -> graft (see README.md).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_upcycle_parser, add_cpt_parser, add_graft_parser, add_eval_parser, add_demo_parser):
        add(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PdmoeError as exc:
        print(f"pdmoe {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
