"""Shipped launch configurations: complete for H100/H200, a default elsewhere, one tile per expert at decode."""

from __future__ import annotations

import pytest
import torch

from pdmoe.kernels.tuning import DECODE_MAX_TOKENS, config_for

KERNELS = ("gate_up_fwd", "scatter_gemm", "act_bwd", "weight_grad")
KEYS = {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"}


@pytest.mark.parametrize("device", ["NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"])
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("n_tokens", [1, 37, DECODE_MAX_TOKENS, 500, 16384])
def test_configs_complete_and_valid(device, kernel, n_tokens):
    cfg = config_for(device, kernel, n_tokens, torch.bfloat16)
    assert set(cfg) == KEYS
    assert all(cfg[k] >= 16 and cfg[k] & (cfg[k] - 1) == 0 for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if kernel != "weight_grad" and n_tokens <= DECODE_MAX_TOKENS:
        assert cfg["BLOCK_M"] >= n_tokens  # an expert owns at most T rows: its weights are read once


def test_hopper_tables_are_shipped_and_fp32_is_lighter():
    bf16 = config_for("NVIDIA H100 80GB HBM3", "gate_up_fwd", 16384, torch.bfloat16)
    fp32 = config_for("NVIDIA H100 80GB HBM3", "gate_up_fwd", 16384, torch.float32)
    other = config_for("NVIDIA A100-SXM4-80GB", "gate_up_fwd", 16384, torch.bfloat16)
    assert bf16["BLOCK_M"] == 128 and other["BLOCK_M"] == 64
    assert fp32["BLOCK_K"] == bf16["BLOCK_K"] // 2 and fp32["num_stages"] <= 3
