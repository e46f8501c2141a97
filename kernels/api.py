"""Public entry points of ``pdmoe.kernels`` (re-exported by the package), and the registration of the
"pdmoe" and "pdmoe_auto" transformers experts implementations."""

from __future__ import annotations

from .reference import ExpertWeights, moe_mlp_reference
from .transformers_experts import register_transformers_experts

try:
    from .moe_op import moe_mlp

    KERNELS_AVAILABLE = True
except ImportError as _err:  # no Triton on this machine
    KERNELS_AVAILABLE = False
    _TRITON_ERROR = _err

    def moe_mlp(hidden, gate_up_proj, down_proj, topk_weights, topk_ids):  # type: ignore[no-redef]
        """Unavailable: Triton could not be imported."""
        raise ImportError("pdmoe.kernels.moe_mlp needs Triton") from _TRITON_ERROR


register_transformers_experts(moe_mlp, KERNELS_AVAILABLE)

__all__ = ["ExpertWeights", "moe_mlp", "moe_mlp_reference", "register_transformers_experts"]
