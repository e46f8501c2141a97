"""A bounded tile search for the large-T bucket of the shipped table, one kernel at a time.

    python bench/gpu_tiles.py --out DIR --budget-s 90

For each large training shape (H, F, E, k) at T = 16384 and each forward/backward GEMM the large bucket
serves (gate_up_fwd, down_fwd, act_bwd, input_grad), the shipped configuration is timed, then its
neighbours (one knob moved: BLOCK_M, BLOCK_N, num_warps, num_stages), best first kept. A candidate that
fails to compile or launch (shared memory, registers) is a row with its error. ``DIR/tiles.jsonl`` gets
every timing as it is measured, ``DIR/tiles.json`` the best configuration per kernel and shape in the
layout of ``kernels/configs/<device>.json`` (the ``large`` bucket), for a person to review and commit.

On CPU (a rehearsal) the shape is tiny, T = 64, and the kernels run in Triton's interpreter.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from gpu_table import median_ms

from pdmoe.kernels import grouped_gemm as gg
from pdmoe.kernels.permutation import permute
from pdmoe.kernels.testing import random_moe_inputs
from pdmoe.kernels.tuning import Gemm, TileConfig, get_config

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
SHAPES = [(4096, 14336, 8, 2), (1536, 8960, 4, 2)] if CUDA else [(64, 128, 4, 2)]
TOKENS = 16384 if CUDA else 64
GEMMS = (Gemm.GATE_UP_FWD, Gemm.DOWN_FWD, Gemm.ACT_BWD, Gemm.INPUT_GRAD)


def neighbours(cfg: TileConfig) -> Iterator[TileConfig]:
    """``cfg`` first, then every configuration one knob away from it."""
    yield cfg
    for key, factors in (("BLOCK_N", (2, 0.5)), ("BLOCK_M", (0.5, 2)), ("num_warps", (0.5, 2))):
        for factor in factors:
            value = int(getattr(cfg, key) * factor)
            if 16 <= value <= 256 and not (key == "num_warps" and value not in (4, 8)):
                yield dataclasses.replace(cfg, **{key: value})
    for stages in (cfg.num_stages - 1, cfg.num_stages + 1):
        if 2 <= stages <= 5:
            yield dataclasses.replace(cfg, num_stages=stages)


def launcher(gemm: Gemm, shape: tuple[int, int, int, int]) -> Callable[[TileConfig], object]:
    """A call of ``gemm`` on random inputs of ``shape`` at TOKENS tokens, taking its configuration."""
    H, F, E, k = shape
    x, gate_up, down, weights, ids = random_moe_inputs(TOKENS, H, F, E, k, dtype=DTYPE, device=DEVICE)
    perm = permute(ids, E)
    n_rows = ids.numel()
    scale = weights.reshape(-1)
    rows_f = torch.randn(n_rows, F, device=DEVICE, dtype=DTYPE)
    rows_h = torch.randn(n_rows, H, device=DEVICE, dtype=DTYPE)
    rows_2f = torch.randn(n_rows, 2 * F, device=DEVICE, dtype=DTYPE)
    calls = {
        Gemm.GATE_UP_FWD: lambda cfg: gg.gate_up_fwd(
            x, gate_up, gate_up, E, E, perm, k, save_preact=True, cfg=cfg
        ),
        Gemm.DOWN_FWD: lambda cfg: gg.grouped_gemm(
            rows_f, down, down, E, E, transpose_w=False, scale=scale, perm=perm, cfg=cfg
        ),
        Gemm.ACT_BWD: lambda cfg: gg.act_bwd(
            rows_h,
            down,
            down,
            E,
            E,
            scale,
            rows_2f,
            perm,
            need_dpreact=True,
            need_dscale=True,
            need_y1s=True,
            cfg=cfg,
        ),
        Gemm.INPUT_GRAD: lambda cfg: gg.grouped_gemm(
            rows_2f, gate_up, gate_up, E, E, transpose_w=True, scale=None, perm=perm, cfg=cfg
        ),
    }
    return calls[gemm]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--out", type=Path, required=True, help="folder for tiles.jsonl and tiles.json")
    parser.add_argument("--budget-s", type=float, default=90.0, help="no candidate starts after this")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    best: dict[str, dict[str, Any]] = {}
    log = (args.out / "tiles.jsonl").open("a")
    for shape in SHAPES:
        for gemm in GEMMS:
            run = launcher(gemm, shape)
            shipped = get_config(gemm, TOKENS, DEVICE, DTYPE)
            winner: tuple[float, TileConfig] | None = None
            for cfg in neighbours(shipped):
                if time.monotonic() > deadline:
                    break
                row: dict[str, Any] = {
                    "shape": list(shape),
                    "kernel": gemm.value,
                    "cfg": dataclasses.asdict(cfg),
                }
                try:
                    row["ms"] = median_ms(functools.partial(run, cfg))
                    if winner is None or row["ms"] < winner[0]:
                        winner = (row["ms"], cfg)
                except Exception as err:  # a candidate that does not fit is a result, not the end
                    row["error"] = f"{type(err).__name__}: {err}".splitlines()[0][:200]
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"{gemm.value:<12} {shape!s:<22} {row.get('ms', row.get('error'))} {cfg}", flush=True)
            if winner is not None:
                base = best.setdefault(gemm.value, {})
                base[str(shape)] = {
                    "ms": winner[0],
                    "large": dataclasses.asdict(winner[1]),
                    "shipped_is_best": winner[1] == shipped,
                }
            if CUDA:
                torch.cuda.empty_cache()
    (args.out / "tiles.json").write_text(json.dumps(best, indent=1))
    print(f"best configurations in {args.out / 'tiles.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
