"""pdmoe: language expansion by upcycling to MoE, continued pre-training, and grafting ParamΔ.

Importing pdmoe is cheap: the command line and the streaming tools (upcycle, graft, export) never
load transformers' models. What makes pdmoe's models usable through transformers happens when
transformers itself gets there (``pdmoe.registration``): ``MoEConfig`` / ``MoEForCausalLM`` join
the Auto classes when transformers' Auto classes are imported, and the Triton kernels become the
experts implementation ``"pdmoe"`` when transformers' MoE integration is. ``MoEConfig``,
``MoEForCausalLM`` and ``MoECausalLMOutput`` load on first access.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pdmoe.registration import register_when_transformers_loads

if TYPE_CHECKING:
    from pdmoe.config import MoEConfig
    from pdmoe.modeling import MoECausalLMOutput, MoEForCausalLM

_LAZY = {
    "MoEConfig": "pdmoe.config",
    "MoEForCausalLM": "pdmoe.modeling",
    "MoECausalLMOutput": "pdmoe.modeling",
}
__all__ = ["MoECausalLMOutput", "MoEConfig", "MoEForCausalLM"]

register_when_transformers_loads()


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pdmoe' has no attribute {name!r}")
