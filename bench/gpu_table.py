"""The kernel table of a first GPU contact, within a time budget: rows written as they are measured.

    python bench/gpu_table.py --out DIR --budget-s 180

Training shapes (H, F, E, k) at T tokens, forward and forward+backward, for ``pdmoe``, the eager
``loop`` and transformers' ``grouped_mm`` (expert_impls.py): median ms, TFLOP/s and % of a dense
8192³ bf16 matmul measured in the same run. Decode (T = 1, 8, 32): GB/s of the active expert weights
read, against the device's measured copy bandwidth, with and without a CUDA graph. Each measurement
has its own ``try`` (a failure is a row with its error) and none starts once the budget is spent;
``DIR/table.jsonl`` gets one JSON line per row, ``DIR/table.md`` the table at the end.

On CPU (a rehearsal of the script, not a measurement worth reading) the shapes are tiny, the
kernels run in Triton's interpreter in fp32 and CUDA graphs are skipped with the reason.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from expert_impls import (
    Shape,
    active_weight_bytes,
    expert_flops,
    make_experts,
    random_inputs,
    run_impl,
)

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES: list[Shape] = (
    [(4096, 14336, 8, 2), (1536, 8960, 4, 2), (2048, 1408, 64, 8)] if CUDA else [(64, 128, 4, 2)]
)
TOKENS = [16384, 4096, 256] if CUDA else [32]
DECODE_TOKENS = [1, 8, 32]
IMPLS = ["pdmoe", "loop", "grouped_mm"]
DECODE_IMPLS = ["pdmoe", "pdmoe+graph", "loop", "grouped_mm", "grouped_mm+graph"]


def median_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds of ``fn``: CUDA events through triton's do_bench (warm-up included), or
    wall time of a few synchronous calls on the CPU."""
    if CUDA:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def device_peaks() -> dict[str, float]:
    """Dense matmul TFLOP/s (8192³ bf16 on CUDA) and copy GB/s (bytes read + written) of this device."""
    n, copy_bytes = (8192, 2**30) if CUDA else (512, 2**26)
    a, b = (torch.randn(n, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return {
        "dense_tflops": 2 * n**3 / median_ms(lambda: a @ b) / 1e9,
        "copy_gbs": 2 * copy_bytes / median_ms(lambda: dst.copy_(src)) / 1e6,
    }


class Table:
    """Rows kept in memory, appended to ``table.jsonl`` as they come, rendered to ``table.md``."""

    def __init__(self, out: Path, deadline: float, peaks: dict[str, float]) -> None:
        self.out, self.deadline, self.peaks = out, deadline, peaks
        self.rows: list[dict] = []

    def measure(self, row: dict, fn: Callable[[], float], rates: Callable[[float], dict]) -> None:
        """``fn()`` gives the row's ms and ``rates(ms)`` its derived numbers; a failure or the spent
        budget is recorded instead."""
        if time.monotonic() > self.deadline:
            row["skipped"] = "time budget spent"
        else:
            try:
                row["ms"] = round(fn(), 4)
                row.update(rates(row["ms"]))
            except Exception as err:  # one failing measurement must not end the table
                row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                (self.out / "table_errors.txt").open("a").write(traceback.format_exc() + "\n")
        self.rows.append(row)
        with (self.out / "table.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(self._line(row), flush=True)

    def skip(self, row: dict, reason: str) -> None:
        row["skipped"] = reason
        self.rows.append(row)
        print(self._line(row), flush=True)

    def _line(self, row: dict) -> str:
        head = f"{row['mode']:<16} {row['shape']:<22} T={row['T']:<6} {row['impl']:<17}"
        if "ms" not in row:
            return f"{head} {row.get('error') or row.get('skipped')}"
        if "tflops" in row:
            rate = f"{row['tflops']:8.3g} TF/s {row.get('pct_of_dense', 0):5.1f} % of dense"
        else:
            rate = f"{row['gbs']:8.0f} GB/s {row.get('pct_of_copy', 0):5.1f} % of copy"
        return f"{head} {row['ms']:9.3f} ms {rate}"

    def write_markdown(self) -> None:
        lines = [
            f"device: {torch.cuda.get_device_name() if CUDA else 'CPU (Triton interpreter)'}; "
            f"torch {torch.__version__}; dense {self.peaks['dense_tflops']:.1f} TF/s, "
            f"copy {self.peaks['copy_gbs']:.0f} GB/s",
            "",
            "| mode | shape (H, F, E, k) | T | impl | ms | rate | % of ceiling |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.rows:
            if "ms" not in r:
                lines.append(
                    f"| {r['mode']} | {r['shape']} | {r['T']} | {r['impl']} | – | {r.get('error') or r.get('skipped')} | |"
                )
                continue
            rate, pct = (
                (f"{r['tflops']:.1f} TF/s", r["pct_of_dense"])
                if "tflops" in r
                else (f"{r['gbs']:.0f} GB/s", r["pct_of_copy"])
            )
            lines.append(
                f"| {r['mode']} | {r['shape']} | {r['T']} | {r['impl']} | {r['ms']:.3f} | {rate} | {pct:.1f} % |"
            )
        (self.out / "table.md").write_text("\n".join(lines) + "\n")


def training_rows(table: Table, shape: Shape) -> None:
    experts = make_experts(shape, DEVICE, DTYPE)
    for T in TOKENS:
        inputs = random_inputs(T, shape, DEVICE, DTYPE)
        for backward in (False, True):
            flops = expert_flops(T, shape, backward)
            for impl in IMPLS:
                table.measure(
                    {"mode": "fwd+bwd" if backward else "fwd", "shape": str(shape), "T": T, "impl": impl},
                    functools.partial(_training_ms, experts, impl, backward, *inputs),
                    functools.partial(_tflops, flops, table.peaks),
                )


def _tflops(flops: int, peaks: dict[str, float], ms: float) -> dict[str, float]:
    tflops = flops / ms / 1e9
    return {"tflops": tflops, "pct_of_dense": 100 * tflops / peaks["dense_tflops"]}


def _gbs(n_bytes: int, peaks: dict[str, float], ms: float) -> dict[str, float]:
    gbs = n_bytes / ms / 1e6
    return {"gbs": gbs, "pct_of_copy": 100 * gbs / peaks["copy_gbs"]}


def _training_ms(experts, impl: str, backward: bool, hidden, ids, weights) -> float:
    leaves = (hidden, weights, experts.gate_up_proj, experts.down_proj)
    for t in leaves:
        t.requires_grad_(backward)
        t.grad = None

    def step() -> None:
        if backward:
            for t in leaves:
                t.grad = None
            run_impl(experts, impl, hidden, ids, weights).float().square().mean().backward()
        else:
            with torch.no_grad():
                run_impl(experts, impl, hidden, ids, weights)

    return median_ms(step)


def decode_rows(table: Table, shape: Shape) -> None:
    experts = make_experts(shape, DEVICE, DTYPE).requires_grad_(False)
    for T in DECODE_TOKENS:
        inputs = random_inputs(T, shape, DEVICE, DTYPE)
        rates = functools.partial(_gbs, active_weight_bytes(experts, inputs[1]), table.peaks)
        for impl in DECODE_IMPLS:
            row = {"mode": "decode", "shape": str(shape), "T": T, "impl": impl}
            if impl.endswith("+graph") and not CUDA:
                table.skip(row, "CUDA graphs need a CUDA device")
            else:
                table.measure(row, functools.partial(_decode_ms, experts, impl, *inputs), rates)


def _decode_ms(experts, impl: str, hidden, ids, weights) -> float:
    base, _, graphed = impl.partition("+")

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return run_impl(experts, base, hidden, ids, weights)

    forward()
    if not graphed:
        return median_ms(forward)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return median_ms(graph.replay)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="folder for table.jsonl and table.md")
    parser.add_argument("--budget-s", type=float, default=180.0, help="no measurement starts after this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    peaks = device_peaks()
    print(f"dense {peaks['dense_tflops']:.3g} TF/s, copy {peaks['copy_gbs']:.0f} GB/s", flush=True)
    (args.out / "peaks.json").write_text(json.dumps(peaks))
    table = Table(args.out, deadline, peaks)
    for shape in SHAPES:  # the decode rows first: they are quick and need the graphs checked
        decode_rows(table, shape)
    for shape in SHAPES:
        training_rows(table, shape)
        if CUDA:
            torch.cuda.empty_cache()
    table.write_markdown()
    failed = [r for r in table.rows if "error" in r]
    print(f"{len(table.rows)} rows, {len(failed)} failed, written to {args.out / 'table.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
