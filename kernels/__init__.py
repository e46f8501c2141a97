"""Expert-MLP kernels of pdmoe: a plain-PyTorch reference and fused Triton kernels.

``moe_mlp`` (Triton; CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``) and ``moe_mlp_reference``
(PyTorch, any device) compute docs/method.md's expert computation with the same signature. Importing this
package also registers the kernels as the transformers experts implementation ``"pdmoe"``. Without
Triton installed, the import still works and only calling ``moe_mlp`` fails.

This directory is the package ``pdmoe.kernels``. When the repository root is on ``sys.path`` (pytest,
or Python started there) it can also be imported as a top-level ``kernels``: transformers does exactly
that when it probes for the Hugging Face ``kernels`` library. Under that name the module stays empty,
so the custom ops and the experts registration happen once, from ``pdmoe.kernels``.
"""

from __future__ import annotations

if __name__ == "pdmoe.kernels":
    from .api import ExpertWeights, moe_mlp, moe_mlp_reference, register_transformers_experts

    __all__ = ["ExpertWeights", "moe_mlp", "moe_mlp_reference", "register_transformers_experts"]
else:
    __all__: list[str] = []
