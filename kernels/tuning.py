"""Launch configurations for the grouped GEMMs: shipped tables for Hopper, a safe default elsewhere.

No autotuning at run time (it would cost minutes on the first call of every shape). The tables in
``configs/<device>.json`` are keyed by kernel and by a token-count bucket (decode / small / large);
they are untuned starting points (see the ``_note`` in the file) until measured on the hardware.
An H200 has the H100's SMs and shared memory (more and faster HBM), so it uses the H100 table until
a table tuned on an H200 exists: ``_DEVICE_TABLES`` is the one place that says so.

Besides tile shapes, warps and pipeline depth, each entry gives ``ctas_per_sm``: how many programs of
the persistent grid run on one SM (the compile gate checks the compiled kernel really fits that many).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import triton

_CONFIG_DIR = Path(__file__).parent / "configs"
_DEVICE_TABLES = {"H100": "h100.json", "H200": "h100.json"}  # H200: the H100 table until one is tuned
DECODE_MAX_TOKENS = 64
SMALL_MAX_TOKENS = 1024
KERNELS = ("gate_up_fwd", "down_fwd", "act_bwd", "input_grad", "weight_grad")
LAUNCH_KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "EPILOGUE_SPLIT", "num_warps", "num_stages")

# Fits any CUDA GPU Triton supports (shared memory ≤ 100 KiB at fp32).
_DEFAULT = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_K": 32,
    "GROUP_M": 8,
    "EPILOGUE_SPLIT": 1,
    "num_warps": 4,
    "num_stages": 2,
    "ctas_per_sm": 2,
}
# fp32 at torch's default "highest" matmul precision (no tensor cores).
_FP32_IEEE = {
    "BLOCK_M": 64,
    "BLOCK_N": 64,
    "BLOCK_K": 16,
    "EPILOGUE_SPLIT": 1,
    "num_warps": 4,
    "num_stages": 2,
    "ctas_per_sm": 2,
}
# The CPU interpreter: small tiles (tl.dot needs every dimension >= 16); two "SMs" so that every
# persistent loop runs several tiles per program.
_INTERPRETER = {**_DEFAULT, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "ctas_per_sm": 1}
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
def _device_table(device_name: str) -> dict[str, Any]:
    for marker, file_name in _DEVICE_TABLES.items():
        if marker in device_name:
            return json.loads((_CONFIG_DIR / file_name).read_text())
    return {}


def config_for(device_name: str, kernel: str, n_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    """Launch configuration of ``kernel`` at ``n_tokens`` on a named CUDA device."""
    cfg = {**_DEFAULT, **_device_table(device_name).get(kernel, {}).get(bucket(n_tokens), {})}
    if bucket(n_tokens) == "decode" and kernel != "weight_grad":  # weight_grad's BLOCK_M tiles H or F
        # Top-k experts are distinct per token, so an expert owns at most T rows: a row tile of
        # next_pow2(T) (>= 16 for tl.dot) holds all of them and each active expert's weights are
        # streamed exactly once, by cdiv(N, BLOCK_N) programs.
        cfg["BLOCK_M"] = max(16, triton.next_power_of_2(n_tokens))
    if dtype == torch.float32:
        _adapt_to_fp32(cfg, kernel)
    return cfg


def _adapt_to_fp32(cfg: dict[str, Any], kernel: str) -> None:
    """fp32 tiles take twice the bytes. IEEE products (torch's default "highest" matmul precision) run
    on the FMA units with both operands in registers: small tiles. TF32 tensor cores: half K, a
    shallower pipeline. Either way gate_up_fwd, with two accumulators, gets half the columns."""
    if torch.get_float32_matmul_precision() == "highest":
        cfg.update(_FP32_IEEE, BLOCK_M=min(cfg["BLOCK_M"], _FP32_IEEE["BLOCK_M"]))
        if kernel == "gate_up_fwd":
            cfg["BLOCK_M"] = min(cfg["BLOCK_M"], 32)
    else:
        cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    if kernel == "gate_up_fwd":
        cfg["BLOCK_N"] = max(16, cfg["BLOCK_N"] // 2)
        cfg["EPILOGUE_SPLIT"] = max(1, min(cfg["EPILOGUE_SPLIT"], cfg["BLOCK_N"] // 32))


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


def get_config(kernel: str, n_tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The configuration for ``kernel`` on ``device`` (the interpreter's when not on CUDA)."""
    info = current_device(device)
    if info.name == "interpreter":
        return dict(_INTERPRETER)
    return config_for(info.name, kernel, n_tokens, dtype)


def programs(cfg: dict[str, Any], device: torch.device) -> int:
    """Programs of a persistent grid: every SM runs ``ctas_per_sm`` of them."""
    return current_device(device).sm_count * cfg["ctas_per_sm"]


def launch_options(cfg: dict[str, Any], *, epilogue: bool = False) -> dict[str, Any]:
    """The constexprs and compile options of ``cfg`` a kernel takes (EPILOGUE_SPLIT only if it has one)."""
    return {key: cfg[key] for key in LAUNCH_KEYS if epilogue or key != "EPILOGUE_SPLIT"}


def split_k(tiles: int, k_steps: int, min_steps: int, cfg: dict[str, Any], device: torch.device) -> int:
    """Slices of the K loop that bring ``tiles`` up to two waves of programs, each slice keeping at least
    ``min_steps`` K steps; 1 where the tiles alone fill the device."""
    want = 2 * programs(cfg, device)
    if tiles >= want or k_steps < 2 * min_steps:
        return 1
    return max(1, min(triton.cdiv(want, max(tiles, 1)), k_steps // min_steps))
