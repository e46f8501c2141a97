"""Expert-MLP kernels of pdmoe: a plain-PyTorch reference and fused Triton kernels.

``moe_mlp`` (Triton; CUDA, or the CPU interpreter with ``TRITON_INTERPRET=1``) and ``moe_mlp_reference``
(PyTorch, any device) compute docs/method.md's expert computation with the same signature. Importing this
package also registers the kernels as the transformers experts implementation ``"pdmoe"``. Without
Triton installed, the import still works and only calling ``moe_mlp`` fails.

This directory is the package ``pdmoe.kernels``. When the repository root is on ``sys.path`` (pytest,
or Python started there) it can also be imported as a top-level ``kernels``, the name of the Hugging
Face ``kernels`` library that transformers imports (since 5.25 it requires it). Under that name this
module hands over to that library when it is installed elsewhere on ``sys.path``, and otherwise stays
empty, so that the custom ops and the experts registration happen once, from ``pdmoe.kernels``.
"""

from __future__ import annotations

if __name__ == "pdmoe.kernels":
    from .api import ExpertWeights, moe_mlp, moe_mlp_reference, register_transformers_experts

    __all__ = ["ExpertWeights", "moe_mlp", "moe_mlp_reference", "register_transformers_experts"]
else:
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _repository = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _repository]
    _library = importlib.machinery.PathFinder.find_spec(__name__, _elsewhere)
    if _library is None or _library.loader is None:
        __all__: list[str] = []
    else:
        # The import system returns whatever sys.modules holds under this name once this module has run.
        _module = importlib.util.module_from_spec(_library)
        sys.modules[__name__] = _module
        _library.loader.exec_module(_module)
