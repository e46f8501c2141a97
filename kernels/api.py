"""Public entry points of ``pdmoe.kernels`` (re-exported by the package), and the "pdmoe" registration."""

from __future__ import annotations

from .reference import ExpertWeights, moe_mlp_reference
from .transformers_experts import register_transformers_experts

try:
    from .moe_op import moe_mlp
except ImportError as _err:  # no Triton on this machine
    _TRITON_ERROR = _err

    def moe_mlp(hidden, gate_up_proj, down_proj, topk_weights, topk_ids):  # type: ignore[no-redef]
        """Unavailable: Triton could not be imported."""
        raise ImportError("pdmoe.kernels.moe_mlp needs Triton") from _TRITON_ERROR


register_transformers_experts(moe_mlp)

__all__ = ["ExpertWeights", "moe_mlp", "moe_mlp_reference", "register_transformers_experts"]
