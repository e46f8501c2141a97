"""``python -m pdmoe.cpt`` / ``accelerate launch -m pdmoe.cpt``: the ``pdmoe cpt`` entry point
(its parser lives with the other commands', in ``pdmoe.cli.cpt``)."""

from __future__ import annotations

import sys

from pdmoe.cli.cpt import main

if __name__ == "__main__":
    sys.exit(main())
