"""The ``pdmoe`` command: one subcommand per pipeline step, each registered by its own package.

Parsing and the checks of paths (``pdmoe.preflight``) need no torch: a command imports its heavy
modules only once its options and paths are known to be good, so errors come in a blink.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pdmoe.errors import PdmoeError, from_os_error
from pdmoe.families import FAMILY_TITLES
from pdmoe.io.outputs import Command, check_output
from pdmoe.options import DTYPE_NAMES
from pdmoe.preflight import check_models
from pdmoe.version import pdmoe_version


class CommandParser(argparse.ArgumentParser):
    """Every pdmoe parser: no abbreviated options (``--num-exp 3`` is refused, not read as
    ``--num-experts 3``: a later option could make the abbreviation mean another one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


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
    parser.add_argument("--shard-size", default="5GB", help="maximum shard size (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    parser.add_argument(
        "--allow-non-finite",
        action="store_true",
        help="copy NaN / inf weights as they are instead of refusing them",
    )
    parser.set_defaults(func=_run_upcycle)


# Every subcommand: its one-line summary and the function that adds its full parser. Only the
# command being run is imported, so `pdmoe --help` and light commands never load what cpt, eval or
# demo need (transformers' models, accelerate).
COMMANDS: dict[str, tuple[str, str]] = {
    "upcycle": (
        "turn a dense checkpoint into an MoE checkpoint (expert 0 = the dense FFN, the rest copies)",
        "pdmoe.cli:add_upcycle_parser",
    ),
    "cpt": (
        "continued pre-training (or the review stage) of an upcycled MoE",
        "pdmoe.cpt.cli:add_cpt_parser",
    ),
    "graft": (
        "graft the post-training delta (INSTRUCT - BASE) onto a CPT model",
        "pdmoe.graft.cli:add_graft_parser",
    ),
    "eval": (
        "per-language perplexity and expert routing shares of an MoE checkpoint",
        "pdmoe.cpt.cli:add_eval_parser",
    ),
    "export": (
        "write a pdmoe MoE as a native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint (serving without pdmoe)",
        "pdmoe.export.cli:add_export_parser",
    ),
    "demo": (
        "run the whole pipeline on tiny models built on the spot, checking its invariants",
        "pdmoe.demo:add_demo_parser",
    ),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``pdmoe`` parser: every command listed, the full options of ``command`` (of all when None)."""
    parser = CommandParser(
        prog="pdmoe",
        description="Language expansion without re-alignment: upcycle -> cpt -> graft (see README.md).",
    )
    parser.add_argument("--version", action="version", version=f"pdmoe {pdmoe_version()}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    for name, (summary, target) in COMMANDS.items():
        if command is None or name == command:
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(subparsers)
        else:
            subparsers.add_parser(name, help=summary)
    return parser


def _command(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line, if any (options before it take no values)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command(argv)
    parser = build_parser(command if command in COMMANDS else "")
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the usage of the command given, not the top level's
        _command_parser(parser, args.command).error(f"unrecognized arguments: {' '.join(unknown)}")
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return run_command(args.command, lambda: args.func(args))


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``command``, or ``parser`` itself when there is none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def run_command(command: str, run: Callable[[], int | None]) -> int:
    """Run a subcommand; a user error (or an OSError the user can fix) is one line on stderr, exit 2."""
    try:
        return int(run() or 0)
    except PdmoeError as exc:
        error: PdmoeError | None = exc
    except OSError as exc:
        error = from_os_error(exc)
        if error is None:
            raise
    print(f"pdmoe {command}: error: {error}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
