"""Upcycle throughput and peak memory on a ~0.5 GiB synthetic dense checkpoint, next to a plain copy.

Throughput is (bytes read + bytes written) / s; upcycle and a plain copy alternate, three rounds
each, and their medians are compared (reported, not asserted: it moves with machine load). Peak memory is
the growth of VmHWM over the RSS after imports in a separate process that runs only the upcycle.
Target: that growth stays under 2 x (one layer's dense FFN + one expert block) + 64 MiB, whatever
the model size (the embeddings, the largest tensor, stream through in blocks).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import (
    DTYPE,
    EXPERTS,
    F,
    H,
    MiB,
    Row,
    copy_inputs,
    interleaved,
    peak_memory,
    record,
    scratch,
    synthetic_checkpoint,
    tensor_bytes,
)

from pdmoe.upcycle import upcycle

LAYERS = 8


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with scratch(tmp_path_factory, "bench-upcycle") as root:
        yield synthetic_checkpoint(root / "dense", LAYERS, False, 0)


def test_upcycle_throughput_and_memory(dense: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    moved: dict[str, int] = {}

    def run_upcycle() -> None:
        upcycle(dense, out, num_experts=EXPERTS, shard_size="300MB", overwrite=True)
        moved["upcycle"] = tensor_bytes(dense) + tensor_bytes(out)

    def run_copy() -> None:
        moved["copy"] = copy_inputs((dense,), tmp_path / "copy")

    seconds = interleaved({"upcycle": run_upcycle, "copy": run_copy}, 3)
    rates = {name: tuple(moved[name] / s / MiB for s in times) for name, times in seconds.items()}
    group = "upcycle ~0.5 GiB bf16"
    record(Row(group, "upcycle MiB/s", rates["upcycle"], "copy", rates["copy"], "MiB/s"))

    shutil.rmtree(out)
    memory = peak_memory(
        "from pdmoe.upcycle import upcycle",
        'upcycle(sys.argv[2], sys.argv[3], num_experts=int(sys.argv[4]), shard_size="300MB")',
        str(dense),
        str(out),
        str(EXPERTS),
    )
    working_set = memory["peak_rss"] - memory["rss_after_imports"]
    ffn_and_expert = 5 * F * H * DTYPE.itemsize  # gate + up + down, then one [2F, H] expert block
    target = 2 * ffn_and_expert + 64 * MiB
    record(Row(group, "working set", (working_set / MiB,), unit="MiB", target=f"<= {target / MiB:.0f} MiB"))
    assert working_set < target, working_set / MiB
