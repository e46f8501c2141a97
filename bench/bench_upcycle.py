"""Upcycle throughput and peak memory on a ~0.5 GiB synthetic dense checkpoint, next to a plain copy.

Throughput is (bytes read + bytes written) / s, the copy's measured in the same run. Peak memory is
the growth of VmHWM over the RSS after imports in a separate process that runs only the upcycle.
Target: that growth stays under 2 x (one layer's dense FFN + one expert block) + 64 MiB, whatever
the model size (the embeddings, the largest tensor, stream through in blocks).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import DTYPE, EXPERTS, F, H, MiB, copy_rate, peak_memory, synthetic_checkpoint, tensor_bytes

from pdmoe.upcycle import upcycle

LAYERS = 8


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic_checkpoint(tmp_path_factory.mktemp("bench-upcycle") / "dense", LAYERS, False, 0)


def test_upcycle_throughput_and_memory(benchmark, dense: Path, tmp_path: Path) -> None:
    copy = copy_rate((dense,), tmp_path / "copy")
    out = tmp_path / "out"

    def run() -> None:
        upcycle(dense, out, num_experts=EXPERTS, shard_size="300MB", overwrite=True)

    benchmark.group = "upcycle of a ~0.5 GiB dense checkpoint (bf16)"
    benchmark.pedantic(run, rounds=1, iterations=1)
    rate = (tensor_bytes(dense) + tensor_bytes(out)) / benchmark.stats.stats.mean

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
    benchmark.extra_info.update(
        {
            "upcycle_mib_per_s": round(rate / MiB),
            "copy_mib_per_s": round(copy / MiB),
            "upcycle_over_copy": round(rate / copy, 3),
            "working_set_mib": round(working_set / MiB),
            "target_working_set_mib": round(target / MiB),
            "output_gib": round(tensor_bytes(out) / 2**30, 3),
        }
    )
    assert working_set < target, benchmark.extra_info
