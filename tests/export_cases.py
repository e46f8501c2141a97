"""The pdmoe MoEs that exports are tried on: one per source family and layer pattern.

Shared by tests/test_export.py and the serving-stack checks in bench/clients/. Every expert and
router is perturbed (``diversify``), so the experts differ from each other and the routing
really matters: an export that mixed experts up or routed wrongly would give other logits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from pdmoe.tiny import build_tiny_dense
from pdmoe.upcycle import upcycle

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}


@dataclass(frozen=True)
class ExportCase:
    family: str
    layers: str  # pdmoe upcycle --layers
    native_type: str  # what --format auto writes
    dense: dict[str, Any] = field(default_factory=dict)  # dense config overrides
    norm_topk_prob: bool = True


CASES = {
    "llama-all": ExportCase(
        "llama", "all", "mixtral", {"rope_parameters": LLAMA3_ROPE, "tie_word_embeddings": True}
    ),
    "mistral-all": ExportCase("mistral", "all", "mixtral", {"sliding_window": 8}),
    "qwen3-all": ExportCase("qwen3", "all", "qwen3_moe"),
    "qwen3-partial": ExportCase("qwen3", "0,2", "qwen3_moe"),
    "qwen3-attention-bias": ExportCase("qwen3", "all", "qwen3_moe", {"attention_bias": True}),
    "qwen2-all": ExportCase(
        "qwen2", "all", "qwen2_moe", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1}
    ),
    "qwen2-all-unnormalised": ExportCase("qwen2", "all", "qwen2_moe", norm_topk_prob=False),
    "qwen2-partial": ExportCase("qwen2", "0,2", "qwen2_moe"),
    "llama-partial": ExportCase("llama", "1", "qwen2_moe"),
    "llama-all-unnormalised": ExportCase("llama", "all", "qwen2_moe", norm_topk_prob=False),
}


def diversify(moe: Path, seed: int, *, like_cpt: bool = False) -> None:
    """Give every expert and router its own values; ``like_cpt`` keeps expert 0 as pdmoe's CPT does
    (the graft checks that it is BASE's FFN)."""
    path = moe / "model.safetensors"
    tensors = load_file(path)
    generator = torch.Generator().manual_seed(seed)
    for name, tensor in tensors.items():
        if ".mlp.gate." in name or ".experts." in name:
            noise = torch.randn(tensor.shape, generator=generator, dtype=tensor.dtype) * 0.05
            if like_cpt and ".experts." in name:
                noise[0] = 0
            tensors[name] = tensor + noise
    save_file(tensors, path, metadata={"format": "pt"})


def build_case(root: Path, name: str, seed: int) -> Path:
    """The pdmoe MoE of case ``name`` under ``root`` (its dense model beside it, ``NAME-dense``)."""
    case = CASES[name]
    dense = build_tiny_dense(root / f"{name}-dense", case.family, seed=seed, **case.dense)
    moe = upcycle(dense, root / name, layers=case.layers)
    diversify(moe, seed)
    if not case.norm_topk_prob:
        config_path = moe / "config.json"
        config_path.write_text(json.dumps(json.loads(config_path.read_text()) | {"norm_topk_prob": False}))
    return moe


def build_cases(root: Path) -> dict[str, Path]:
    return {name: build_case(root, name, seed) for seed, name in enumerate(CASES)}
