"""The ``pdmoe`` command, the application shell: one module of this package per subcommand.

The core (``pdmoe.*`` outside this package) never imports the command line nor ``pdmoe.cpt``;
this package composes them. Parsing and the checks of paths (``pdmoe.preflight``) need no torch:
a command imports its heavy modules only once its options and paths are known to be good, so
errors come in a blink.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import Any, TypeVar

from pdmoe.errors import Option, PdmoeError, Spelling, from_os_error, keyword_spelling
from pdmoe.version import pdmoe_version


class CommandParser(argparse.ArgumentParser):
    """Every pdmoe parser: no abbreviated options (``--num-exp 3`` is refused, not read as
    ``--num-experts 3``: a later option could make the abbreviation mean another one)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "allow_abbrev": False})


Options = TypeVar("Options")


def options_from_args(options: type[Options], args: argparse.Namespace) -> Options:
    """The options dataclass ``options`` of a command line: every field is the destination of a flag."""
    return options(**{field.name: getattr(args, field.name) for field in fields(options)})


# Every subcommand: its one-line summary and the function that adds its full parser. Only the
# command being run is imported, so `pdmoe --help` and light commands never load what cpt, eval or
# demo need (transformers' models, accelerate).
COMMANDS: dict[str, tuple[str, str]] = {
    "upcycle": (
        "turn a dense checkpoint into an MoE checkpoint (expert 0 = the dense FFN, the rest copies)",
        "pdmoe.cli.upcycle:add_upcycle_parser",
    ),
    "cpt": (
        "continued pre-training (or the review stage) of an upcycled MoE",
        "pdmoe.cli.cpt:add_cpt_parser",
    ),
    "graft": (
        "graft the post-training delta (INSTRUCT - BASE) onto a CPT model",
        "pdmoe.cli.graft:add_graft_parser",
    ),
    "eval": (
        "per-language perplexity and expert routing shares of an MoE checkpoint",
        "pdmoe.cli.eval:add_eval_parser",
    ),
    "export": (
        "write a pdmoe MoE as a native Mixtral / Qwen2-MoE / Qwen3-MoE checkpoint (serving without pdmoe)",
        "pdmoe.cli.export:add_export_parser",
    ),
    "demo": (
        "run the whole pipeline on tiny models built on the spot, checking its invariants",
        "pdmoe.cli.demo:add_demo_parser",
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
    return run_command(args.command, _command_parser(parser, args.command), lambda: args.func(args))


def _command_parser(parser: argparse.ArgumentParser, command: str | None) -> argparse.ArgumentParser:
    """The parser of subcommand ``command``, or ``parser`` itself when there is none."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            return action.choices[command]
    return parser


def flag_spelling(parser: argparse.ArgumentParser) -> Spelling:
    """How ``parser``'s command line names an option of an error: its flag (``--allow-modified-base``,
    ``--format mixtral``, ``--no-x`` for a negated switch) or, for a positional, its metavar; an
    option the parser does not have keeps the Python spelling."""
    actions = {action.dest: action for action in parser._actions}

    def spell(option: Option) -> str:
        action = actions.get(option.name)
        if action is None:
            return keyword_spelling(option)
        if not action.option_strings:
            return action.metavar or action.dest.upper()
        flags = sorted(action.option_strings, key=len, reverse=True)
        if option.value is False:
            return next((flag for flag in flags if flag.startswith("--no-")), flags[0])
        flag = next(flag for flag in flags if not flag.startswith("--no-"))
        return flag if option.value is None or option.value is True else f"{flag} {option.value}"

    return spell


def run_command(command: str, parser: argparse.ArgumentParser, run: Callable[[], int | None]) -> int:
    """Run a subcommand; a user error (or an OSError the user can fix) is one line on stderr, exit 2,
    naming options by ``parser``'s flags."""
    try:
        return int(run() or 0)
    except PdmoeError as exc:
        error: PdmoeError | None = exc
    except OSError as exc:
        error = from_os_error(exc)
        if error is None:
            raise
    print(f"pdmoe {command}: error: {error.render(flag_spelling(parser))}", file=sys.stderr)
    return 2
