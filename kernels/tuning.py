"""Launch configurations for the grouped GEMMs: shipped tables for Hopper, a safe default elsewhere.

No autotuning at run time (it would cost minutes on the first call of every shape). The tables in
``configs/<device>.json`` are keyed by kernel and by a token-count bucket (decode / small / large);
they are untuned starting points (see the ``_note`` in the files) until measured on the hardware.
In the decode bucket the row tile is sized to the token count instead (see ``config_for``).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import torch

_CONFIG_DIR = Path(__file__).parent / "configs"
_DEVICE_FILES = {"H100": "h100.json", "H200": "h200.json"}
DECODE_MAX_TOKENS = 64
SMALL_MAX_TOKENS = 1024

# Fits any CUDA GPU Triton supports (shared memory ≤ 100 KiB at fp32).
_DEFAULT = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 8, "num_warps": 4, "num_stages": 2}
# The CPU interpreter: few, large-enough programs (tl.dot needs every dimension >= 16).
_INTERPRETER = {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4, "num_warps": 1, "num_stages": 1}


def bucket(n_tokens: int) -> str:
    """Token-count bucket a config table is keyed by."""
    if n_tokens <= DECODE_MAX_TOKENS:
        return "decode"
    return "small" if n_tokens <= SMALL_MAX_TOKENS else "large"


@functools.cache
def _device_table(device_name: str) -> dict[str, Any]:
    for marker, file_name in _DEVICE_FILES.items():
        if marker in device_name:
            return json.loads((_CONFIG_DIR / file_name).read_text())
    return {}


def config_for(device_name: str, kernel: str, n_tokens: int, dtype: torch.dtype) -> dict[str, Any]:
    """BLOCK_M/N/K, GROUP_M, num_warps, num_stages for ``kernel`` at ``n_tokens`` on a named CUDA device."""
    table = _device_table(device_name)
    cfg = dict(table.get(kernel, {}).get(bucket(n_tokens), _DEFAULT))
    if bucket(n_tokens) == "decode" and kernel != "weight_grad":  # weight_grad's BLOCK_M tiles H or F
        # Top-k experts are distinct per token, so an expert owns at most T rows: a row tile of
        # next_pow2(T) (>= 16 for tl.dot) holds all of them and each active expert's weights are
        # streamed exactly once, by cdiv(N, BLOCK_N) programs.
        cfg["BLOCK_M"] = max(16, 1 << max(n_tokens - 1, 0).bit_length())
    if dtype == torch.float32:
        # Twice the bytes per tile: halve K and keep the pipeline shallow to stay within shared memory.
        cfg["BLOCK_K"] = max(16, cfg["BLOCK_K"] // 2)
        cfg["num_stages"] = min(cfg["num_stages"], 3)
    return cfg


def get_config(kernel: str, n_tokens: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The configuration for ``kernel`` on ``device`` (the interpreter's when not on CUDA)."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return dict(_INTERPRETER)
    return config_for(torch.cuda.get_device_name(device), kernel, n_tokens, dtype)
