"""Launch configurations for the grouped GEMMs: shipped tables for Hopper, a safe default elsewhere.

No autotuning at run time (it would cost minutes on the first call of every shape). The tables in
``configs/<device>.json`` are keyed by GEMM (``Gemm``'s values) and by a token-count bucket (decode /
small / large); they are untuned starting points (see the ``_note`` in the file) until measured on the
hardware. An H200 has the H100's SMs and shared memory (more and faster HBM), so it uses the H100 table
until a table tuned on an H200 exists: ``_DEVICE_TABLES`` is the one place that says so.

Besides tile shapes, warps and pipeline depth, each entry gives ``ctas_per_sm``: how many programs of
the persistent grid run on one SM (the compile gate checks the compiled kernel really fits that many).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import json
import os
from pathlib import Path
from typing import NamedTuple

import torch
import triton

_CONFIG_DIR = Path(__file__).parent / "configs"
_DEVICE_TABLES = {"H100": "h100.json", "H200": "h100.json"}  # H200: the H100 table until one is tuned
DECODE_MAX_TOKENS = 64
SMALL_MAX_TOKENS = 1024


class Gemm(enum.Enum):
    """The grouped GEMMs of the expert MLP (grouped_gemm.py); the values key the config tables."""

    GATE_UP_FWD = "gate_up_fwd"
    DOWN_FWD = "down_fwd"
    ACT_BWD = "act_bwd"
    INPUT_GRAD = "input_grad"
    WEIGHT_GRAD = "weight_grad"


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One launch configuration: the kernel's tile constexprs (named as the kernels name them), its
    compile options, and how many programs of the persistent grid share an SM."""

    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    GROUP_M: int
    EPILOGUE_SPLIT: int  # column slices of the accumulator the epilogue works on (fewer live registers)
    num_warps: int
    num_stages: int
    ctas_per_sm: int

    def launch_options(self, *, epilogue: bool = False) -> dict[str, int]:
        """The constexprs and compile options a kernel launch takes (EPILOGUE_SPLIT only if it has one)."""
        options = dataclasses.asdict(self)
        del options["ctas_per_sm"]
        if not epilogue:
            del options["EPILOGUE_SPLIT"]
        return options


# Fits any CUDA GPU Triton supports (shared memory ≤ 100 KiB at fp32).
_DEFAULT = TileConfig(
    BLOCK_M=64, BLOCK_N=64, BLOCK_K=32, GROUP_M=8, EPILOGUE_SPLIT=1, num_warps=4, num_stages=2, ctas_per_sm=2
)
# fp32 at torch's default "highest" matmul precision (no tensor cores); BLOCK_M is capped separately.
_FP32_IEEE = {
    "BLOCK_N": 64,
    "BLOCK_K": 16,
    "EPILOGUE_SPLIT": 1,
    "num_warps": 4,
    "num_stages": 2,
    "ctas_per_sm": 2,
}
# The CPU interpreter: small tiles (tl.dot needs every dimension >= 16); two "SMs" so that every
# persistent loop runs several tiles per program.
_INTERPRETER = dataclasses.replace(_DEFAULT, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=4, ctas_per_sm=1)
_INTERPRETER_SMS = 2


class DeviceInfo(NamedTuple):
    """What the launchers need to know about the device: its table, SM count and TMA support."""

    name: str
    sm_count: int
    tma: bool


def bucket(n_tokens: int) -> str:
    """Token-count bucket a config table is keyed by."""
    if n_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "small" if n_tokens <= SMALL_MAX_TOKENS else "large"


@functools.cache
def _device_table(device_name: str) -> dict[Gemm, dict[str, TileConfig]]:
    """The device's table, every entry completed from ``_DEFAULT`` (an unknown key is a TypeError)."""
    for marker, file_name in _DEVICE_TABLES.items():
        if marker in device_name:
            raw = json.loads((_CONFIG_DIR / file_name).read_text())
            return {
                gemm: {
                    size: dataclasses.replace(_DEFAULT, **entry)
                    for size, entry in raw.get(gemm.value, {}).items()
                }
                for gemm in Gemm
            }
    return {}


def config_for(device_name: str, gemm: Gemm, n_tokens: int, dtype: torch.dtype) -> TileConfig:
    """Launch configuration of ``gemm`` at ``n_tokens`` on a named CUDA device."""
    cfg = _device_table(device_name).get(gemm, {}).get(bucket(n_tokens), _DEFAULT)
    if bucket(n_tokens) == "decode" and gemm is not Gemm.WEIGHT_GRAD:  # weight_grad's BLOCK_M tiles H or F
        # Top-k experts are distinct per token, so an expert owns at most T rows: a row tile of
        # next_pow2(T) (>= 16 for tl.dot) holds all of them and each active expert's weights are
        # streamed exactly once, by cdiv(N, BLOCK_N) programs.
        cfg = dataclasses.replace(cfg, BLOCK_M=max(16, triton.next_power_of_2(n_tokens)))
    if dtype == torch.float32:
        cfg = _adapt_to_fp32(cfg, gemm)
    return cfg


def _adapt_to_fp32(cfg: TileConfig, gemm: Gemm) -> TileConfig:
    """fp32 tiles take twice the bytes. IEEE products (torch's default "highest" matmul precision) run
    on the FMA units with both operands in registers: small tiles. TF32 tensor cores: half K, a
    shallower pipeline. Either way gate_up_fwd, with two accumulators, gets half the columns."""
    if torch.get_float32_matmul_precision() == "highest":
        max_block_m = 32 if gemm is Gemm.GATE_UP_FWD else 64
        cfg = dataclasses.replace(cfg, **_FP32_IEEE, BLOCK_M=min(cfg.BLOCK_M, max_block_m))
    else:
        cfg = dataclasses.replace(cfg, BLOCK_K=max(16, cfg.BLOCK_K // 2), num_stages=min(cfg.num_stages, 3))
    if gemm is Gemm.GATE_UP_FWD:
        block_n = max(16, cfg.BLOCK_N // 2)
        epilogue_split = max(1, min(cfg.EPILOGUE_SPLIT, block_n // 32))
        cfg = dataclasses.replace(cfg, BLOCK_N=block_n, EPILOGUE_SPLIT=epilogue_split)
    return cfg


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _cuda_device(index: int) -> DeviceInfo:
    props = torch.cuda.get_device_properties(index)
    return DeviceInfo(props.name, props.multi_processor_count, props.major >= 9)


def current_device(device: torch.device) -> DeviceInfo:
    """The device a launch runs on; the interpreter counts as a small TMA-capable device."""
    if device.type != "cuda" or interpreting():
        return DeviceInfo("interpreter", _INTERPRETER_SMS, True)
    return _cuda_device(device.index if device.index is not None else torch.cuda.current_device())


def get_config(gemm: Gemm, n_tokens: int, device: torch.device, dtype: torch.dtype) -> TileConfig:
    """The configuration for ``gemm`` on ``device`` (the interpreter's when not on CUDA)."""
    info = current_device(device)
    if info.name == "interpreter":
        return _INTERPRETER
    return config_for(info.name, gemm, n_tokens, dtype)


def programs(cfg: TileConfig, device: torch.device) -> int:
    """Programs of a persistent grid: every SM runs ``ctas_per_sm`` of them."""
    return current_device(device).sm_count * cfg.ctas_per_sm


def split_k(tiles: int, k_steps: int, min_steps: int, cfg: TileConfig, device: torch.device) -> int:
    """Slices of the K loop that bring ``tiles`` up to two waves of programs, each slice keeping at least
    ``min_steps`` K steps; 1 where the tiles alone fill the device."""
    want = 2 * programs(cfg, device)
    if tiles >= want or k_steps < 2 * min_steps:
        return 1
    return max(1, min(triton.cdiv(want, max(tiles, 1)), k_steps // min_steps))
