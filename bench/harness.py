"""What the benchmarks share: the device, synchronisation, synthetic checkpoints, copy speed, peak
memory of a command run in a child process, interleaved timing and the summary table.

Benchmarks import it as ``harness`` (pytest puts ``bench/`` on ``sys.path``), the way Liger-Kernel's
benchmarks share ``benchmark/scripts/utils.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from pdmoe.io.safetensors_format import TensorMeta
from pdmoe.io.writer import CheckpointWriter, plan_shards

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
MiB = 2**20
REPOSITORY = Path(__file__).resolve().parents[1]

# Synthetic checkpoints: a Qwen2.5-0.5B-like model (bf16, vocabulary 151936 x 896, the embeddings
# being the largest tensor as in real LLMs).
DTYPE = torch.bfloat16
H, F, VOCAB, HEADS, KV_HEADS, EXPERTS = 896, 4864, 151936, 14, 2, 4


# Model-level benchmarks: a realistic size on a GPU, a tiny one on CPU so the suite stays usable.
MODEL_SIZES = (
    {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 4,
        "num_attention_heads": 16,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 32000,
        "max_position_embeddings": 4096,
    }
    if CUDA
    else {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "max_position_embeddings": 512,
    }
)


def sync() -> None:
    """Wait for the device, so a timing covers the work and not only its launch."""
    if CUDA:
        torch.cuda.synchronize()


def synthetic_config(layers: int, moe: bool) -> dict:
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
        "architectures": ["Qwen2ForCausalLM"],
    }
    if moe:
        config |= {
            "architectures": ["MoEForCausalLM"],
            "model_type": "pdmoe",
            "base_model_type": "qwen2",
            "num_experts": EXPERTS,
            "moe_layers": list(range(layers)),
        }
    return config


def synthetic_layout(layers: int, moe: bool) -> list[TensorMeta]:
    """Every tensor of the synthetic dense (or upcycled MoE) checkpoint, in file order."""
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


def synthetic_checkpoint(directory: Path, layers: int, moe: bool, seed: int) -> Path:
    """A random checkpoint written tensor by tensor (never a whole model in memory)."""
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(synthetic_config(layers, moe)))
    generator = torch.Generator().manual_seed(seed)
    pool = torch.randn(2**24 + 1, generator=generator).to(DTYPE)  # tiled: the values do not matter
    writer = CheckpointWriter(directory, plan_shards(synthetic_layout(layers, moe), 300 * 10**6))
    for index, shard in enumerate(writer.shards):
        with writer.open_shard(index) as shard_writer:
            for number, meta in enumerate(shard):
                values = torch.roll(pool, number).repeat(-(-meta.numel // pool.numel()))[: meta.numel]
                shard_writer.write(meta.name, values.reshape(meta.shape))
    writer.finish()
    return directory


@contextlib.contextmanager
def scratch(factory: pytest.TempPathFactory, name: str) -> Iterator[Path]:
    """A folder for a benchmark's inputs, removed when the benchmark is done with it, passed or
    failed: they are GBs, and pytest keeps its last three sessions' temporary folders."""
    root = factory.mktemp(name)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def tensor_bytes(directory: Path) -> int:
    """Bytes of a checkpoint's safetensors files."""
    return sum(path.stat().st_size for path in Path(directory).glob("*.safetensors"))


def copy_inputs(inputs: tuple[Path, ...], folder: Path) -> int:
    """Copy the inputs' safetensors files into ``folder``, fsynced, then delete the copies: the I/O
    floor of a command that reads them and writes as much. Returns the bytes read + written."""
    folder.mkdir()
    copied = 0
    for directory in inputs:
        for path in directory.glob("*.safetensors"):
            target = folder / f"{directory.name}-{path.name}"
            shutil.copyfile(path, target)
            with target.open("rb+") as handle:
                os.fsync(handle.fileno())
            copied += path.stat().st_size
    shutil.rmtree(folder)
    return 2 * copied


_MEMORY_PROBE = """
import json, sys, time
def status():
    return {k: int(v.split()[0]) * 1024 for k, v in (l.split(":", 1) for l in open("/proc/self/status"))
            if k in ("VmRSS", "VmHWM")}
before = status()
start = time.perf_counter()
exec(sys.argv[1])
print(json.dumps({"seconds": time.perf_counter() - start, "rss_after_imports": before["VmRSS"],
                  "peak_rss": status()["VmHWM"]}))
"""


def peak_memory(setup: str, statement: str, *args: str) -> dict[str, float]:
    """Run ``setup`` (imports) then ``statement`` in a fresh Python process (``sys.argv[2:]`` are
    ``args``): its seconds, RSS after ``setup`` and peak RSS (VmHWM), so pytest's memory is not counted."""
    code = _MEMORY_PROBE.replace("before = status()", f"{setup}\nbefore = status()")
    child = subprocess.run(
        [sys.executable, "-c", code, statement, *args],
        check=True,
        capture_output=True,
        text=True,
        cwd=REPOSITORY,
    )
    return json.loads(child.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Timing that survives a busy machine, and the compact table every benchmark reports into.
#
# A candidate and its baseline run alternately (A B A B ...), so load that comes and goes hits
# both alike; targets compare medians, and assertions keep a margin below the target where the
# quantity itself moves with load (CPU-bound work against I/O-bound baselines).


def interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Seconds of each run per round, the runs alternating within every round."""
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
    return seconds


@dataclass(frozen=True)
class Row:
    """One line of the summary table: a measured quantity of a candidate next to its baseline's."""

    group: str
    name: str
    values: tuple[float, ...]  # every repeat
    baseline: str = ""
    baseline_values: tuple[float, ...] = ()
    unit: str = "s"
    target: str = ""  # e.g. "<= 1.3x", ">= 0.4x" or "<= 400 MiB"

    @property
    def ratio(self) -> float | None:
        """Candidate median over baseline median."""
        if not self.baseline_values:
            return None
        return statistics.median(self.values) / statistics.median(self.baseline_values)


RESULTS: list[Row] = []


def record(row: Row) -> Row:
    """Add a row to the summary that ``pytest --benchmark`` prints at the end (any benchmark may)."""
    RESULTS.append(row)
    return row


def _number(value: float, unit: str) -> str:
    return f"{value:.3g}" if unit != "MiB" else f"{value:.0f}"


def summary_table(rows: list[Row]) -> str:
    """Rows as a compact table: min and median of every repeat, ratio of medians to the baseline."""
    header = ("benchmark", "min", "median", "unit", "baseline (median)", "ratio", "target")
    lines = [header]
    for row in rows:
        ratio = "" if row.ratio is None else f"{row.ratio:.2f}x"
        base = (
            ""
            if not row.baseline
            else f"{row.baseline} ({_number(statistics.median(row.baseline_values), row.unit)})"
        )
        lines.append(
            (
                f"{row.group}: {row.name}",
                _number(min(row.values), row.unit),
                _number(statistics.median(row.values), row.unit),
                row.unit,
                base,
                ratio,
                row.target,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = [
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)
