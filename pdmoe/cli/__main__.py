"""``python -m pdmoe.cli``: the ``pdmoe`` command."""

import sys

from pdmoe.cli import main

sys.exit(main())
