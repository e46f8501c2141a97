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

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pdmoe.graft import graft
from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import CheckpointWriter, plan_shards

DTYPE = torch.bfloat16
H, F, VOCAB, HEADS, KV_HEADS, EXPERTS = 896, 4864, 151936, 14, 2, 4
LAYERS = {"dense": 24, "moe": 8}
SHARD_SIZE = "300MB"
MiB = 2**20


def _config(layers: int, moe: bool) -> dict:
    config = {
        "model_type": "qwen2",
        "hidden_size": H,
        "intermediate_size": F,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "vocab_size": VOCAB,
        "tie_word_embeddings": True,
        "dtype": "bfloat16",
    }
    if moe:
        config |= {
            "model_type": "pdmoe",
            "base_model_type": "qwen2",
            "num_experts": EXPERTS,
            "moe_layers": list(range(layers)),
        }
    return config


def _layout(layers: int, moe: bool) -> list[TensorMeta]:
    kv = H // HEADS * KV_HEADS
    metas = [
        TensorMeta("model.embed_tokens.weight", DTYPE, (VOCAB, H)),
        TensorMeta("model.norm.weight", DTYPE, (H,)),
    ]
    for i in range(layers):
        p = f"model.layers.{i}"
        metas += [
            TensorMeta(f"{p}.input_layernorm.weight", DTYPE, (H,)),
            TensorMeta(f"{p}.post_attention_layernorm.weight", DTYPE, (H,)),
            TensorMeta(f"{p}.self_attn.q_proj.weight", DTYPE, (H, H)),
            TensorMeta(f"{p}.self_attn.k_proj.weight", DTYPE, (kv, H)),
            TensorMeta(f"{p}.self_attn.v_proj.weight", DTYPE, (kv, H)),
            TensorMeta(f"{p}.self_attn.o_proj.weight", DTYPE, (H, H)),
        ]
        if moe:
            metas += [
                TensorMeta(f"{p}.mlp.gate.weight", DTYPE, (EXPERTS, H)),
                TensorMeta(f"{p}.mlp.experts.gate_up_proj", DTYPE, (EXPERTS, 2 * F, H)),
                TensorMeta(f"{p}.mlp.experts.down_proj", DTYPE, (EXPERTS, H, F)),
            ]
        else:
            metas += [
                TensorMeta(f"{p}.mlp.gate_proj.weight", DTYPE, (F, H)),
                TensorMeta(f"{p}.mlp.up_proj.weight", DTYPE, (F, H)),
                TensorMeta(f"{p}.mlp.down_proj.weight", DTYPE, (H, F)),
            ]
    return metas


def _synthetic(directory: Path, layers: int, moe: bool, seed: int) -> Path:
    """A random checkpoint written tensor by tensor (never a whole model in memory)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(_config(layers, moe)))
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(2**24 + 1, generator=generator).to(
        DTYPE
    )  # tiled: the values do not matter, speed does
    writer = CheckpointWriter(directory, plan_shards(_layout(layers, moe), 300 * 10**6))
    for index, shard in enumerate(writer.shards):
        with writer.open_shard(index) as shard_writer:
            for number, meta in enumerate(shard):
                values = torch.roll(pool, number).repeat(-(-meta.numel // pool.numel()))[: meta.numel]
                shard_writer.write(meta.name, values.reshape(meta.shape))
    writer.finish()
    return directory


def _tensor_bytes(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.glob("*.safetensors"))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, Path]]:
    root = tmp_path_factory.mktemp("bench-graft")
    dense_base = _synthetic(root / "dense-base", LAYERS["dense"], False, 0)
    moe_base = _synthetic(root / "moe-base", LAYERS["moe"], False, 3)
    return {
        "dense": (
            dense_base,
            _synthetic(root / "dense-instruct", LAYERS["dense"], False, 1),
            _synthetic(root / "dense-cpt", LAYERS["dense"], False, 2),
        ),
        "moe": (
            moe_base,
            _synthetic(root / "moe-instruct", LAYERS["moe"], False, 4),
            _synthetic(root / "moe-cpt", LAYERS["moe"], True, 5),
        ),
    }


def _copy_rate(inputs: tuple[Path, ...], scratch: Path) -> float:
    """(read + written) bytes/s of copying the inputs' safetensors files, fsynced."""
    scratch.mkdir()
    copied = 0
    start = time.perf_counter()
    for directory in inputs:
        for path in directory.glob("*.safetensors"):
            target = scratch / f"{directory.name}-{path.name}"
            shutil.copyfile(path, target)
            with target.open("rb+") as handle:
                os.fsync(handle.fileno())
            copied += path.stat().st_size
    seconds = time.perf_counter() - start
    shutil.rmtree(scratch)
    return 2 * copied / seconds


_CHILD = """
import json, sys, time
from pdmoe.graft import graft
def status():
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status")) if k in ("VmRSS", "VmHWM")}
before = status()
start = time.perf_counter()
graft(*sys.argv[1:5], shard_size=sys.argv[5])
print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_imports": before["VmRSS"], "peak_rss": status()["VmHWM"]}))
"""


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_graft_throughput_and_memory(benchmark, checkpoints, tmp_path: Path, kind: str) -> None:
    inputs = checkpoints[kind]
    copy_rate = _copy_rate(inputs, tmp_path / "copy")
    out = tmp_path / "out"

    def run() -> None:
        shutil.rmtree(out, ignore_errors=True)
        graft(*inputs, out, shard_size=SHARD_SIZE)

    benchmark.group = "graft of ~1 GiB checkpoints (bf16)"
    benchmark.pedantic(run, rounds=1, iterations=1)
    moved = sum(_tensor_bytes(d) for d in inputs) + _tensor_bytes(out)
    graft_rate = moved / benchmark.stats.stats.mean

    shutil.rmtree(out)
    child = subprocess.run(
        [sys.executable, "-c", _CHILD, *map(str, inputs), str(out), SHARD_SIZE],
        check=True,
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    memory = json.loads(child.stdout.strip().splitlines()[-1])
    largest = max(
        meta.nbytes
        for d in inputs
        for meta in _layout(LAYERS[kind], d.name.endswith("cpt") and kind == "moe")
    )
    target_rss = 2 * largest + 256 * MiB
    benchmark.extra_info.update(
        {
            "bytes_moved_gib": round(moved / 2**30, 3),
            "graft_mib_per_s": round(graft_rate / MiB),
            "copy_mib_per_s": round(copy_rate / MiB),
            "graft_over_copy": round(graft_rate / copy_rate, 3),
            "peak_rss_mib": round(memory["peak_rss"] / MiB),
            "rss_after_imports_mib": round(memory["rss_after_imports"] / MiB),
            "graft_working_set_mib": round((memory["peak_rss"] - memory["rss_after_imports"]) / MiB),
            "largest_tensor_mib": round(largest / MiB),
            "target_peak_rss_mib": round(target_rss / MiB),
            "child_graft_seconds": round(memory["seconds"], 2),
        }
    )
    assert graft_rate >= 0.4 * copy_rate, benchmark.extra_info
    assert memory["peak_rss"] < target_rss, benchmark.extra_info
