"""Start-up of the ``pdmoe`` command next to ``python -c "import torch"``, the floor of any command
that touches a tensor, and how fast usage and path errors come.

Each command runs in a fresh process, the commands alternate (seven rounds), and medians are
compared. Targets: every light command within 1.3x of ``import torch`` (the command line imports
only the command being run, and none below loads transformers' models); a usage or path error
within 0.5x of it (under a second where ``import torch`` takes two): options and paths are checked
before torch, transformers and accelerate load.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import REPOSITORY, Row, interleaved, record, scratch

from pdmoe.tiny import build_tiny_dense

ROUNDS = 7
TARGET = 1.3
ERROR_TARGET = 0.5
_SCRIPT = Path(sys.executable).with_name("pdmoe")
PDMOE = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "pdmoe.cli"]
COMMANDS = {
    "python -c 'import torch'": [sys.executable, "-c", "import torch"],
    "pdmoe --help": [*PDMOE, "--help"],
    "pdmoe upcycle --help": [*PDMOE, "upcycle", "--help"],
    "pdmoe graft --help": [*PDMOE, "graft", "--help"],
    "pdmoe export --help": [*PDMOE, "export", "--help"],
}


def _runner(command: list[str], exit_code: int = 0):
    def run() -> None:
        done = subprocess.run(command, capture_output=True, cwd=REPOSITORY)
        assert done.returncode == exit_code, done.stderr[-2000:]

    return run


def _record_against_baseline(
    group: str, seconds: dict[str, list[float]], baseline: str, names, target: float
) -> None:
    """A summary row per command against ``baseline``'s times; every median ratio at most ``target``."""
    rows = [
        record(
            Row(group, name, tuple(seconds[name]), baseline, tuple(seconds[baseline]), target=f"<= {target}x")
        )
        for name in names
    ]
    slow = {row.name: round(row.ratio, 2) for row in rows if row.ratio > target}
    assert not slow, slow


def test_cli_start_up_is_close_to_importing_torch() -> None:
    seconds = interleaved({name: _runner(command) for name, command in COMMANDS.items()}, ROUNDS)
    baseline, *commands = COMMANDS
    _record_against_baseline("start-up", seconds, baseline, commands, TARGET)


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with scratch(tmp_path_factory, "bench-startup") as root:
        (root / "text.jsonl").write_text('{"text": "hello", "lang": "en"}\n')
        yield build_tiny_dense(root / "dense", "llama")


def test_usage_and_path_errors_come_before_heavy_imports(dense: Path) -> None:
    data, missing = str(dense.parent / "text.jsonl"), str(dense.parent / "missing")
    errors = {
        "pdmoe cpt --model DENSE (not an MoE)": [
            *PDMOE,
            "cpt",
            "--model",
            str(dense),
            "--data",
            data,
            "--new-langs",
            "en",
            "--out",
            missing,
        ],
        "pdmoe cpt --modle (mistyped)": [*PDMOE, "cpt", "--modle", str(dense), "--data", data, "--out", "x"],
        "pdmoe eval --model MISSING": [
            *PDMOE,
            "eval",
            "--model",
            missing,
            "--data",
            data,
            "--new-langs",
            "en",
        ],
        "pdmoe graft --bas (abbreviated)": [*PDMOE, "graft", "--bas", str(dense)],
        "pdmoe upcycle --model MISSING": [*PDMOE, "upcycle", "--model", missing, "--out", "x"],
    }
    baseline = "python -c 'import torch'"
    runs = {baseline: _runner(COMMANDS[baseline])} | {name: _runner(argv, 2) for name, argv in errors.items()}
    seconds = interleaved(runs, ROUNDS)
    _record_against_baseline("error", seconds, baseline, errors, ERROR_TARGET)
