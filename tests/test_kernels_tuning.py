"""Launch configurations: complete for every kernel and bucket, within Hopper's shared memory in bf16 and
fp32, one row tile per expert at decode, the H100 table on an H200, and when K is split."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pdmoe.kernels import tuning
from pdmoe.kernels.tuning import DECODE_MAX_TOKENS, Gemm, TileConfig, config_for, split_k

H100, H200, A100 = "NVIDIA H100 80GB HBM3", "NVIDIA H200", "NVIDIA A100-SXM4-80GB"
HOPPER_BLOCK_SHARED = 232448


def pipeline_bytes(gemm: Gemm, cfg: TileConfig, dtype: torch.dtype) -> int:
    """Shared memory of the K-loop's buffers: num_stages × (A tile + B tile(s))."""
    m, n, k = cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K
    b_tiles = 2 if gemm is Gemm.GATE_UP_FWD else 1  # gate and up
    return cfg.num_stages * (m * k + b_tiles * n * k) * dtype.itemsize


@pytest.mark.parametrize("device", [H100, H200, A100])
@pytest.mark.parametrize("gemm", Gemm)
@pytest.mark.parametrize("n_tokens", [1, 37, DECODE_MAX_TOKENS, 500, 16384])
def test_configs_complete_and_valid(device, gemm, n_tokens):
    cfg = config_for(device, gemm, n_tokens, torch.bfloat16)
    assert all(type(v) is int and v > 0 for v in dataclasses.astuple(cfg))  # the JSON gave integers
    assert all(b >= 16 and b & (b - 1) == 0 for b in (cfg.BLOCK_M, cfg.BLOCK_N, cfg.BLOCK_K))
    assert cfg.BLOCK_N % cfg.EPILOGUE_SPLIT == 0 and cfg.BLOCK_N // cfg.EPILOGUE_SPLIT >= 16
    if gemm is not Gemm.WEIGHT_GRAD and n_tokens <= DECODE_MAX_TOKENS:
        assert n_tokens <= cfg.BLOCK_M  # an expert owns at most T rows: its weights are read once
    for dtype in (torch.bfloat16, torch.float32):
        assert pipeline_bytes(gemm, config_for(device, gemm, n_tokens, dtype), dtype) <= HOPPER_BLOCK_SHARED


def test_every_table_entry_is_a_known_gemm_and_bucket():
    """The JSON's keys are ``Gemm`` values and buckets (a misspelt one would silently fall back)."""
    table = json.loads((Path(tuning.__file__).parent / "configs" / "h100.json").read_text())
    assert set(table) - {"_note"} == {gemm.value for gemm in Gemm}
    assert all(set(sizes) == {"decode", "small", "large"} for key, sizes in table.items() if key != "_note")


def test_launch_options_are_the_kernel_constexprs_and_compile_options():
    cfg = config_for(H100, Gemm.ACT_BWD, 16384, torch.bfloat16)
    assert cfg.launch_options() == {
        "BLOCK_M": cfg.BLOCK_M,
        "BLOCK_N": cfg.BLOCK_N,
        "BLOCK_K": cfg.BLOCK_K,
        "GROUP_M": cfg.GROUP_M,
        "num_warps": cfg.num_warps,
        "num_stages": cfg.num_stages,
    }
    assert cfg.launch_options(epilogue=True) == {**cfg.launch_options(), "EPILOGUE_SPLIT": cfg.EPILOGUE_SPLIT}


def test_h200_uses_the_h100_table_and_other_gpus_the_default():
    for gemm in Gemm:
        for n_tokens in (1, 500, 16384):
            assert config_for(H200, gemm, n_tokens, torch.bfloat16) == config_for(
                H100, gemm, n_tokens, torch.bfloat16
            )
    hopper = config_for(H100, Gemm.GATE_UP_FWD, 16384, torch.bfloat16)
    other = config_for(A100, Gemm.GATE_UP_FWD, 16384, torch.bfloat16)
    assert pipeline_bytes(Gemm.GATE_UP_FWD, other, torch.bfloat16) < pipeline_bytes(
        Gemm.GATE_UP_FWD, hopper, torch.bfloat16
    )


def test_fp32_tiles_take_no_more_shared_memory_than_bf16():
    for gemm in Gemm:
        for n_tokens in (1, 500, 16384):
            bf16 = config_for(H100, gemm, n_tokens, torch.bfloat16)
            fp32 = config_for(H100, gemm, n_tokens, torch.float32)
            assert pipeline_bytes(gemm, fp32, torch.float32) <= pipeline_bytes(gemm, bf16, torch.bfloat16)


def test_split_k_fills_two_waves_only_when_tiles_do_not(monkeypatch):
    monkeypatch.setattr(tuning, "current_device", lambda device: tuning.DeviceInfo(H100, 132, True))
    cfg = config_for(H100, Gemm.DOWN_FWD, 1, torch.bfloat16)
    device = torch.device("cuda")
    waves = 2 * 132 * cfg.ctas_per_sm
    assert split_k(waves, 1000, 2, cfg, device) == 1  # enough tiles already
    assert split_k(2 * 48, 2, 2, cfg, device) == 1  # too short a K to split
    split = split_k(2 * 48, 56, 2, cfg, device)  # 2 experts x H/BLOCK_N at H = 1536, F = 14336
    assert split > 1 and split * 2 * 48 >= waves and 56 // split >= 2
