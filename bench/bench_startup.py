"""Start-up of the ``pdmoe`` command next to ``python -c "import torch"``, the floor of any command
that touches a tensor.

Each command runs in a fresh process, the commands alternate (seven rounds), and medians are
compared. Target: every light command within 1.3x of ``import torch``: the command line imports
only the command being run, and no command below loads transformers' models.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from harness import REPOSITORY, Row, interleaved, record

ROUNDS = 7
TARGET = 1.3
_SCRIPT = Path(sys.executable).with_name("pdmoe")
PDMOE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "pdmoe.cli"]
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "pdmoe --help": [*PDMOE, "--help"],
    "pdmoe upcycle --help": [*PDMOE, "upcycle", "--help"],
    "pdmoe graft --help": [*PDMOE, "graft", "--help"],
    "pdmoe export --help": [*PDMOE, "export", "--help"],
}


def _runner(command: list[str]):
    def run() -> None:
        subprocess.run(command, check=True, capture_output=True, cwd=REPOSITORY)

    return run


def test_cli_start_up_is_close_to_importing_torch() -> None:
    seconds = interleaved({name: _runner(command) for name, command in COMMANDS.items()}, ROUNDS)
    baseline, *commands = COMMANDS
    rows = [
        record(
            Row(
                "start-up",
                name,
                tuple(seconds[name]),
                baseline,
                tuple(seconds[baseline]),
                target=f"<= {TARGET}x",
            )
        )
        for name in commands
    ]
    slow = {row.name: round(row.ratio, 2) for row in rows if row.ratio > TARGET}
    assert not slow, slow
