"""Expert-MLP kernels of pdmoe: a plain-PyTorch reference and (on CUDA) fused Triton kernels."""

from __future__ import annotations

from .reference import ExpertWeights, moe_mlp_reference

__all__ = ["ExpertWeights", "moe_mlp_reference"]
