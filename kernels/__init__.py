"""Expert-MLP kernels of pdmoe: a plain-PyTorch reference and fused Triton kernels.

``moe_mlp`` (Triton; CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``) and ``moe_mlp_reference``
(PyTorch, any device) compute METHOD.md's expert computation with the same signature. Importing this
package also registers the kernels as the transformers experts implementation ``"pdmoe"``. Without
Triton installed, the import still works and only calling ``moe_mlp`` fails.
"""

from __future__ import annotations

from .reference import ExpertWeights, moe_mlp_reference
from .transformers_experts import register_transformers_experts

try:
    from .moe_mlp import moe_mlp
except ImportError as _err:  # no Triton on this machine
    _TRITON_ERROR = _err

    def moe_mlp(hidden, gate_up_proj, down_proj, topk_weights, topk_ids):  # type: ignore[no-redef]
        """Unavailable: Triton could not be imported."""
        raise ImportError("pdmoe.kernels.moe_mlp needs Triton") from _TRITON_ERROR


register_transformers_experts(moe_mlp)

__all__ = ["ExpertWeights", "moe_mlp", "moe_mlp_reference", "register_transformers_experts"]
