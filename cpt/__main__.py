"""``python -m pdmoe.cpt`` / ``accelerate launch -m pdmoe.cpt``: the ``pdmoe cpt`` entry point."""

from __future__ import annotations

import sys

from pdmoe.cli import CommandParser, run_command

from .cli import add_cpt_arguments, run_cpt


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="python -m pdmoe.cpt", description="Continued pre-training of an upcycled MoE."
    )
    add_cpt_arguments(parser)
    args = parser.parse_args(argv)
    return run_command("cpt", lambda: run_cpt(args))


if __name__ == "__main__":
    sys.exit(main())
