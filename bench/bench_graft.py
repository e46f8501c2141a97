"""Graft throughput and peak memory on ~1 GiB synthetic checkpoints, next to a plain copy.

Throughput is (bytes read + bytes written) / s: for the graft, the three inputs' files read once
plus the output written; for the copy, the same three inputs copied (read + written), fsynced like
the graft's shards, in the same run from the same page cache. Peak RSS is VmHWM of a separate
process that runs only the graft (``python -c``), so nothing of pytest's own memory counts.

Shapes are those of a Qwen2.5-0.5B-like model (bf16, vocabulary 151936 x 896, the largest tensor
being the embeddings, as in real LLMs): dense, 24 layers; MoE, 8 layers of 4 experts, upcycled
from an 8-layer dense model. Targets: >= 40 % of copy throughput, VmHWM < 2 x largest tensor +
256 MiB.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from harness import MiB, copy_rate, peak_memory, synthetic_checkpoint, synthetic_layout, tensor_bytes

from pdmoe.graft import graft

LAYERS = {"dense": 24, "moe": 8}
SHARD_SIZE = "300MB"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("bench-graft")
    dense_base = synthetic_checkpoint(root / "dense-base", LAYERS["dense"], False, 0)
    moe_base = synthetic_checkpoint(root / "moe-base", LAYERS["moe"], False, 3)
    return {
        "dense": (
            dense_base,
            synthetic_checkpoint(root / "dense-instruct", LAYERS["dense"], False, 1),
            synthetic_checkpoint(root / "dense-cpt", LAYERS["dense"], False, 2),
        ),
        "moe": (
            moe_base,
            synthetic_checkpoint(root / "moe-instruct", LAYERS["moe"], False, 4),
            synthetic_checkpoint(root / "moe-cpt", LAYERS["moe"], True, 5),
        ),
    }


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_graft_throughput_and_memory(benchmark, checkpoints, tmp_path: Path, kind: str) -> None:
    inputs = checkpoints[kind]
    copy = copy_rate(inputs, tmp_path / "copy")
    out = tmp_path / "out"

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        graft(*inputs, out, shard_size=SHARD_SIZE, allow_modified_base=True)  # synthetic CPT: not BASE's

    benchmark.group = "graft of ~1 GiB checkpoints (bf16)"
    benchmark.pedantic(run, rounds=1, iterations=1)
    moved = sum(tensor_bytes(d) for d in inputs) + tensor_bytes(out)
    graft_rate = moved / benchmark.stats.stats.mean

    shutil.rmtree(out)
    memory = peak_memory(
        "from pdmoe.graft import graft",
        "graft(*sys.argv[2:6], shard_size=sys.argv[6], allow_modified_base=True)",
        *map(str, inputs),
        str(out),
        SHARD_SIZE,
    )
    largest = max(
        meta.nbytes
        for d in inputs
        for meta in synthetic_layout(LAYERS[kind], d.name.endswith("cpt") and kind == "moe")
    )
    target_rss = 2 * largest + 256 * MiB
    benchmark.extra_info.update(
        {
            "bytes_moved_gib": round(moved / 2**30, 3),
            "graft_mib_per_s": round(graft_rate / MiB),
            "copy_mib_per_s": round(copy / MiB),
            "graft_over_copy": round(graft_rate / copy, 3),
            "peak_rss_mib": round(memory["peak_rss"] / MiB),
            "rss_after_imports_mib": round(memory["rss_after_imports"] / MiB),
            "graft_working_set_mib": round((memory["peak_rss"] - memory["rss_after_imports"]) / MiB),
            "largest_tensor_mib": round(largest / MiB),
            "target_peak_rss_mib": round(target_rss / MiB),
            "child_graft_seconds": round(memory["seconds"], 2),
        }
    )
    assert graft_rate >= 0.4 * copy, benchmark.extra_info
    assert memory["peak_rss"] < target_rss, benchmark.extra_info
