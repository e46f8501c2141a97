"""Project-wide pytest set-up.

* Without a CUDA device, Triton kernels run in the interpreter: the variable must be set before
  triton is first imported, hence here, at the very top of collection.
* ``pytest`` runs ``tests/``; ``pytest --benchmark`` runs the benchmark suite in ``bench/`` instead,
  ends with the summary table of ``bench/harness.py`` (every benchmark's rows, medians and ratios
  to their baselines), and keeps pytest-benchmark's own tables narrow (min, median, rounds).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_ROOT = Path(__file__).parent


def pytest_addoption(parser):
    parser.addoption(
        "--benchmark",
        action="store_true",
        default=False,
        help="run the benchmark suite in bench/ (and nothing else) with pytest-benchmark",
    )


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    if config.getoption("--benchmark") and config.getoption("benchmark_columns", None) is None:
        config.option.benchmark_columns = ["min", "median", "rounds"]


def pytest_terminal_summary(terminalreporter, config):
    harness = sys.modules.get("harness")
    if config.getoption("--benchmark") and harness is not None and harness.RESULTS:
        terminalreporter.write_sep(
            "=", "pdmoe benchmarks: medians of interleaved repeats, ratio to the baseline"
        )
        terminalreporter.write_line(harness.summary_table(harness.RESULTS))


def pytest_ignore_collect(collection_path: Path, config):
    bench_dir = _ROOT / "bench"
    in_bench = collection_path == bench_dir or bench_dir in collection_path.parents
    if config.getoption("--benchmark"):
        tests_dir = _ROOT / "tests"
        return collection_path == tests_dir or tests_dir in collection_path.parents or None
    return in_bench or None


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)
